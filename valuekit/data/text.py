"""Text to token ids: the built-in byte tokenizer, a local Hugging Face tokenizer folder, and a text
classifier's padded id rows (`load_table(tokenizer=...)`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from valuekit.errors import InputError


class ByteTokenizer:
    """UTF-8 bytes; ids: PAD 0, BOS 1, EOS 2, byte b -> b + 3 (valuekit.models.builtin' byte vocabulary)."""

    name = "bytes"
    bos_id, eos_id = 1, 2
    vocab_size = 259

    def encode(self, text: str) -> list[int]:
        return [b + 3 for b in text.encode("utf-8")]

    def describe(self) -> dict:
        return {"kind": "bytes", "vocab_size": self.vocab_size}


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory (nothing downloaded)."""

    def __init__(self, path: str):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            said = "needs the optional 'transformers' package (pip install 'valuekit[llm]')"
            raise InputError(f"tokenizer={str(path)!r}: {said}", cli=f"--tokenizer {path}: {said}") from None
        if not Path(path).is_dir():
            raise InputError(f"tokenizer={str(path)!r}: not a directory", cli=f"--tokenizer {path}: not a directory")
        try:
            self.tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except Exception as exc:  # transformers raises OSError/ValueError/... for a broken folder
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            said = f"does not load as a tokenizer ({first[:200]})"
            raise InputError(f"tokenizer={str(path)!r}: {said}", cli=f"--tokenizer {path}: {said}") from None
        self.path = str(path)
        self.bos_id, self.eos_id = self.tok.bos_token_id, self.tok.eos_token_id
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.vocab_size = len(self.tok)

    def encode(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False)["input_ids"])

    def describe(self) -> dict:
        return {"kind": "huggingface", "path": self.path, "vocab_size": self.vocab_size}


def get_tokenizer(path: str | None):
    return ByteTokenizer() if path is None else HFTokenizer(path)


def token_id_rows(texts, tokenizer, *, max_len: int, width: int | None = None, where: str, col: str,
                  ids) -> np.ndarray:
    """A text classifier's inputs: each row's token ids (no special tokens), cut to `max_len`, padded with the
    tokenizer's pad id (0 when it has none) to `width` (default: the longest row), so the user's model can
    mask padding as `ids != pad`. A missing text stops with its row's id."""
    rows = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise InputError(f"{where}: column {col!r} has a missing text at id {ids[i]}")
        rows.append(tokenizer.encode(text)[:max_len])
    width = width or max(1, max(len(r) for r in rows))
    padded = np.full((len(rows), width), getattr(tokenizer, "pad_id", 0), dtype=np.int64)
    out = np.empty(len(rows), dtype=object)  # one array per row: a list column (numpy would make it 2-D)
    for i, r in enumerate(rows):
        padded[i, : min(len(r), width)] = r[:width]
        out[i] = padded[i]
    return out
