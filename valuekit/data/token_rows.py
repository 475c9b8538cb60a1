"""Tokenised instruction rows kept packed: one flat int32 array of every row's token sequence plus offsets.

A causal-LM table used to live as two dense (N, max_len) tensors (float32 inputs, int64 targets: 12 bytes
per position, 3 KiB a row at max_len 256, whatever the row's length). `TokenRows` stands in for either
tensor and builds only the rows it is indexed with, so memory is the tokens themselves (4 bytes each) plus
12 bytes a row; streamed (`TokenPacker(stream=True)`), the tokens are in a temporary file read back per batch
(valuekit.data.images.SpillFile) and memory holds only the 12 bytes a row. Layout (valuekit.data.instructions):
sequence = [BOS] prompt response [EOS]; x = sequence[:-1] with PAD_INPUT after the end, y = sequence[1:]
with IGNORE on the prompt and the padding.
"""

from __future__ import annotations

import numpy as np

from valuekit.data.rowviews import row_index, to_device

IGNORE = -100  # target positions that carry no loss (prompt, padding)
PAD_INPUT = -1  # input positions after the sequence's end
HASH_ROWS = 4096  # rows materialised at a time when a table is hashed
AUTO_STREAM_TOKENS = 16 * 2**20  # stream="auto": tokens move to a temporary file past 64 MiB of them


def pack_sequences(prompts, responses, tokenizer, max_len: int):
    """(tokens int32 flat, lengths int64 (N,), starts int32 (N,), cut bool (N,)): each row's sequence
    [BOS] prompt response [EOS] and the position of its first response token. The prompt is cut from the left
    when prompt + response do not fit in max_len + 1 tokens; a response longer than that is cut from the
    right (then no EOS)."""
    seqs, starts, cut = [], [], []
    bos = [tokenizer.bos_id] if tokenizer.bos_id is not None else []
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    room = max_len + 1
    for p, r in zip(prompts, responses):
        head = bos + tokenizer.encode(p)
        tail = tokenizer.encode(r) + eos
        trimmed = len(head) + len(tail) > room
        tail = tail[: room - 1]
        head = head[max(0, len(head) - (room - len(tail))):] if len(head) + len(tail) > room else head
        if not head:  # the model needs one input token before the first scored one
            head, tail = tail[:1], tail[1:]
        seqs.append(head + tail)
        starts.append(len(head))
        cut.append(trimmed)
    lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
    flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths, np.asarray(starts, dtype=np.int32), np.asarray(cut, dtype=bool)


class TokenRows:
    """Packed token sequences standing in for a read-only (N, width) tensor: kind "x" float32 input ids
    (PAD_INPUT after the end), kind "y" int64 next-token targets (IGNORE outside the response). Row i's
    sequence is tokens[offsets[i]:offsets[i+1]], its response starts at starts[i]. Indexing returns a
    torch tensor on `device`; `x_and_y` gives the two views of one storage."""

    def __init__(self, tokens, offsets: np.ndarray, starts: np.ndarray, width: int, kind: str, device="cpu"):
        import torch

        # tokens: an int32 array, or a SpillFile holding them (4 bytes each, in row order)
        self.tokens, self.offsets, self.starts, self.width, self.kind = tokens, offsets, starts, int(width), kind
        self.device = torch.device(device)
        self.dtype = torch.float32 if kind == "x" else torch.int64
        self.shape = torch.Size((len(offsets) - 1, self.width))

    @classmethod
    def x_and_y(cls, tokens, lengths, starts, width: int) -> tuple[TokenRows, TokenRows]:
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        return cls(tokens, offsets, starts, width, "x"), cls(tokens, offsets, starts, width, "y")

    @property
    def streamed(self) -> bool:
        return not isinstance(self.tokens, np.ndarray)

    def resident_bytes(self) -> int:
        """What the rows hold in this process's memory (a streamed table's tokens are in the page cache)."""
        return self.offsets.nbytes + self.starts.nbytes + (0 if self.streamed else self.tokens.nbytes)

    def _span(self, lo: int, hi: int) -> np.ndarray:
        """The tokens of rows lo..hi-1, concatenated."""
        a, b = int(self.offsets[lo]), int(self.offsets[hi])
        if self.streamed:
            return np.frombuffer(self.tokens.read(4 * a, 4 * b), dtype=np.int32)
        return self.tokens[a:b]

    # ---- tensor-like surface (what the loop, the trainers and score_rows use)

    def __len__(self) -> int:
        return self.shape[0]

    def dim(self) -> int:
        return 2

    def to(self, device=None, *args, non_blocking: bool = False, **kw) -> TokenRows:
        import torch

        if device is None or not isinstance(device, (str, torch.device)):
            return self
        return TokenRows(self.tokens, self.offsets, self.starts, self.width, self.kind, device)

    def cpu(self) -> TokenRows:
        return self.to("cpu")

    def rows(self, index) -> np.ndarray:
        """The indexed rows as a dense numpy array (B, width)."""
        index = np.asarray(index, dtype=np.int64).reshape(-1)
        if self.kind == "x":
            out = np.full((len(index), self.width), PAD_INPUT, dtype=np.float32)
        else:
            out = np.full((len(index), self.width), IGNORE, dtype=np.int64)
        contiguous = len(index) > 1 and bool((np.diff(index) == 1).all())
        block = self._span(int(index[0]), int(index[-1]) + 1) if contiguous else None  # one read for a chunk
        base = int(self.offsets[index[0]]) if contiguous else 0
        for k, i in enumerate(index.tolist()):
            if block is not None:
                seq = block[self.offsets[i] - base: self.offsets[i + 1] - base]
            else:
                seq = self._span(i, i + 1)
            if self.kind == "x":
                out[k, : len(seq) - 1] = seq[:-1]
            else:
                h = int(self.starts[i])
                out[k, h - 1: len(seq) - 1] = seq[h:]
        return out

    def __getitem__(self, key):
        import torch

        if isinstance(key, (int, np.integer)) or (isinstance(key, torch.Tensor) and key.dim() == 0):
            return torch.from_numpy(self.rows([int(key) % len(self)])[0]).to(self.device)
        return to_device(self.rows(row_index(key, len(self))), self.device)

    def numpy(self) -> np.ndarray:
        """Every row dense (N, width): as much memory as the unpacked table."""
        return self.rows(np.arange(len(self)))

    # ---- what only packed rows can say cheaply

    def lengths(self):
        """Input tokens per row (positions before PAD_INPUT), as valuekit.models.lm.token_lengths gives for a tensor."""
        import torch

        return torch.from_numpy(np.diff(self.offsets) - 1)

    def sample_stats(self, limit: int = 4096) -> tuple[float, float]:
        """Token ids are not features: the LM adapters embed them and ignore the loop's mean/std."""
        return 0.0, 1.0

    def feed(self, h) -> None:
        """Update hash `h` with the dense rows' bytes, HASH_ROWS rows at a time: the same digest as hashing
        `numpy().tobytes()` (so run fingerprints match the unpacked table's) without building it."""
        for i in range(0, len(self), HASH_ROWS):
            h.update(self.rows(np.arange(i, min(i + HASH_ROWS, len(self)))).tobytes())


class TokenPacker:
    """Collects `pack_sequences` chunks into one table: tokens in memory (stream=False), in a temporary file
    (True), or in memory until AUTO_STREAM_TOKENS of them and in a file from then on ("auto")."""

    def __init__(self, *, stream=False):
        self.stream, self.store = stream, None
        self.parts, self.lengths, self.starts, self.size, self.max_token = [], [], [], 0, -1

    def add(self, flat: np.ndarray, lengths: np.ndarray, starts: np.ndarray) -> None:
        self.lengths.append(lengths)
        self.starts.append(starts)
        self.size += len(flat)
        self.max_token = max(self.max_token, int(flat.max()) if len(flat) else -1)
        if self.store is None and (self.stream is True or (self.stream == "auto" and self.size > AUTO_STREAM_TOKENS)):
            from valuekit.data.images import SpillFile

            self.store = SpillFile(prefix="valuekit-tokens-")
            for part in self.parts:
                self.store.append(memoryview(part))
            self.parts = []
        if self.store is not None:
            self.store.append(memoryview(np.ascontiguousarray(flat, dtype=np.int32)))
        else:
            self.parts.append(flat)

    def finish(self, width: int) -> tuple[TokenRows, TokenRows]:
        if self.store is not None:
            self.store.close_writing()
        tokens = self.store if self.store is not None else (np.concatenate(self.parts) if self.parts else
                                                            np.zeros(0, np.int32))
        self.parts = []
        return TokenRows.x_and_y(tokens, np.concatenate(self.lengths), np.concatenate(self.starts), width)
