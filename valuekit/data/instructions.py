"""Instruction tables for causal-LM fine-tuning: prepare one offline, read it, tokenise it.

Table columns: `id`, `prompt`, `response`, optional `task` (any `--source-col`; the BADS paper's
per-task setting), and the evaluation-only `is_noisy` (never given to a method).

`prepare_instructions` builds a real multi-task set offline from Django's translation catalogs
(valuekit.data.multilingual): one task per source language X, prompt "Translate from <X> to English: <text>",
response the English message. Evaluation corruptions: a *junk task* (rows of one more language whose
responses are replaced by random text) and a fraction of junk rows mixed into the real tasks; every
corrupted row has is_noisy = True. Random text (`junk_kind="random"`) is drawn character by character from
the character frequencies of all English responses, with the original response's length, so junk rows are
not longer, shorter or made of different characters than real ones -- only unpredictable.
`junk_kind="swap"` instead gives a junk row the English response of another message (a mismatched pair:
fluent English that does not translate the prompt).

Tokenisation (`load_instructions`): sequence = [BOS] prompt response [EOS]; the model reads
x = sequence[:-1] and is scored on y = sequence[1:], where every target that is still part of the
prompt, and every padding position, is IGNORE (-100). So the per-example loss (mean token NLL over
y != IGNORE, valuekit.ops.losses.per_example_loss) is the response's loss only. x holds PAD_INPUT
(-1) after the sequence's end, which the LM adapters use to run each batch only up to its longest row.
"""


from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from valuekit.data.text import ByteTokenizer
from valuekit.data.token_rows import TokenPacker, TokenRows, pack_sequences
from valuekit.errors import InputError

CHUNK_ROWS = 4096  # rows tokenised at a time: the Python token lists of a whole table would dwarf its packed ids


INSTRUCTION_SUFFIXES = (".parquet", ".pq", ".csv", ".jsonl")


DEFAULT_TASKS = ("es", "fr", "de", "ru", "ja", "fi")


DEFAULT_JUNK = "pt"


LANGUAGE_NAMES = {
    "es": "Spanish", "fr": "French", "de": "German", "ru": "Russian", "ja": "Japanese", "fi": "Finnish",
    "pt": "Portuguese", "it": "Italian", "nl": "Dutch", "pl": "Polish", "tr": "Turkish", "ar": "Arabic",
    "ko": "Korean", "zh_Hans": "Chinese", "ca": "Catalan", "gl": "Galician", "ast": "Asturian",
    "cs": "Czech", "hu": "Hungarian", "sv": "Swedish", "uk": "Ukrainian", "el": "Greek",
}


JUNK_KINDS = ("random", "swap")


def read_instructions(source, *, name: str = "train") -> tuple[pd.DataFrame, str | None]:
    """(DataFrame, path) from a .parquet/.csv/.jsonl path or a DataFrame; InputError naming the file."""
    if isinstance(source, pd.DataFrame):
        return source, None
    path = Path(source)
    if not path.exists():
        raise InputError(f"{path}: no such file ({name} table)")
    suffix = path.suffix.lower()
    try:
        if suffix in (".parquet", ".pq"):
            df = pd.read_parquet(path)
        elif suffix == ".csv":
            df = pd.read_csv(path, keep_default_na=False, dtype={"prompt": str, "response": str})
        elif suffix == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        else:
            raise InputError(f"{path}: unsupported file type {suffix!r}; use {', '.join(INSTRUCTION_SUFFIXES)}")
    except InputError:
        raise
    except Exception as exc:  # pyarrow / pandas parse errors: one line naming the file
        raise _cannot_read(path, name, exc) from None
    return df, str(path)


def _cannot_read(path, name: str, exc: Exception) -> InputError:
    return InputError(
        f"{path}: cannot read {name} table ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})"
    )


def write_instructions(frame: pd.DataFrame, path, *, meta: dict | None = None) -> str:
    """Write an instruction table as .parquet (metadata in the schema), .jsonl or .csv, atomically."""
    from valuekit.runs.atomic import write_parquet_atomic

    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in (".parquet", ".pq"):
        t = pa.Table.from_pandas(frame.reset_index(drop=True), preserve_index=False)
        if meta:
            t = t.replace_schema_metadata({**(t.schema.metadata or {}), b"valuekit.dataset": json.dumps(meta).encode()})
        write_parquet_atomic(t, path)
        return str(path)
    tmp = path.with_name(f".{path.name}.tmp")
    if suffix == ".jsonl":
        frame.to_json(tmp, orient="records", lines=True, force_ascii=False, double_precision=15)
    elif suffix == ".csv":
        frame.to_csv(tmp, index=False)
    else:
        raise InputError(f"{path}: unsupported file type {suffix!r}; use {', '.join(INSTRUCTION_SUFFIXES)}")
    tmp.replace(path)
    return str(path)


def _prompt(lang: str, text: str) -> str:
    return f"Translate from {LANGUAGE_NAMES.get(lang, lang)} to English: {text}\n"


def _random_texts(lengths, alphabet: np.ndarray, probs: np.ndarray, rng: np.random.Generator) -> list[str]:
    """Random strings of the given lengths; the ends are never whitespace (texts are stripped elsewhere)."""
    solid = np.array([not c.isspace() for c in alphabet])
    ps = np.where(solid, probs, 0.0) / probs[solid].sum()
    out = []
    for n in lengths:
        n = max(int(n), 1)
        mid = rng.choice(alphabet, size=max(n - 2, 0), p=probs).tolist()
        ends = rng.choice(alphabet, size=min(n, 2), p=ps).tolist()
        out.append("".join(ends[:1] + mid + ends[1:]))
    return out


def _swapped(train: pd.DataFrame, rows: np.ndarray, rng: np.random.Generator) -> list[str]:
    """For each of `rows`, the response of a random train row of another message (group)."""
    groups, responses = train.group.to_numpy(), train.response.to_numpy()
    donors = rng.integers(len(train), size=len(rows))
    for _ in range(100):  # redraw donors of the same message; one message cannot fill a whole table
        same = groups[donors] == groups[rows]
        if not same.any():
            break
        donors[same] = rng.integers(len(train), size=int(same.sum()))
    return responses[donors].tolist()


def build_instructions(
    *, tasks=DEFAULT_TASKS, junk_task: str | None = DEFAULT_JUNK, max_chars: int = 80
) -> pd.DataFrame:
    """All rows before splitting and corruption: group (English string id), lang, prompt, response."""
    from valuekit.data.multilingual import catalog_pairs

    langs = list(dict.fromkeys([*tasks, *([junk_task] if junk_task else [])]))
    rows = catalog_pairs(langs, max_chars=max_chars)
    frame = pd.DataFrame(rows, columns=["lang", "src", "response"]).drop_duplicates(["response", "lang"])
    english = sorted(frame["response"].unique())
    frame["group"] = frame["response"].map({t: i for i, t in enumerate(english)}).astype("int64")
    frame["prompt"] = [_prompt(lang, s) for lang, s in zip(frame["lang"], frame["src"])]
    return frame.sort_values(["group", "lang"]).reset_index(drop=True)


def prepare_instructions(
    out_dir,
    *,
    tasks=DEFAULT_TASKS,
    junk_task: str | None = DEFAULT_JUNK,
    noise: float = 0.1,
    dev_size: int = 100,
    test_size: int = 100,
    max_per_task: int | None = None,
    max_chars: int = 80,
    fmt: str = "parquet",
    seed: int = 0,
    junk_kind: str = "random",
) -> dict[str, str]:
    """Write DIR/{train,dev,test}.<fmt>; see the module docstring.

    dev/test hold `dev_size`/`test_size` English strings (groups), each as one clean row of a real task
    (the task drawn at random); those groups are removed from training for every language. train holds
    the rest, at most `max_per_task` rows per task; then a `noise` fraction of the real tasks' train rows
    get junk responses, and the `junk_task` language (if any) is added as task "junk", all junk (random text
    or, with junk_kind="swap", another message's English response).
    """
    tasks = tuple(tasks)
    if not tasks:
        raise InputError("tasks=(): give at least one language", cli="--tasks: give at least one language")
    if junk_task in tasks:
        raise InputError(f"junk_task={junk_task!r}: is also a real task; choose another language",
                         cli=f"--junk-task {junk_task}: is also a real task; choose another language")
    if not 0 <= noise < 1:
        raise InputError(f"noise={noise}: must be in [0, 1)", cli=f"--noise {noise}: must be in [0, 1)")
    if dev_size < 1 or test_size < 1:
        raise InputError(f"dev_size={dev_size} / test_size={test_size}: must be >= 1",
                         cli=f"--dev-size {dev_size} / --test-size {test_size}: must be >= 1")
    if max_per_task is not None and max_per_task < 1:
        raise InputError(
            f"max_per_task={max_per_task}: must be >= 1", cli=f"--max-per-task {max_per_task}: must be >= 1"
        )
    if fmt not in ("parquet", "jsonl", "csv"):
        raise InputError(f"fmt={fmt!r}: use parquet, jsonl or csv", cli=f"--format {fmt!r}: use parquet, jsonl or csv")
    if junk_kind not in JUNK_KINDS:
        kinds = " or ".join(JUNK_KINDS)
        raise InputError(f"junk_kind={junk_kind!r}: use {kinds}", cli=f"--junk-kind {junk_kind!r}: use {kinds}")
    frame = build_instructions(tasks=tasks, junk_task=junk_task, max_chars=max_chars)
    rng = np.random.default_rng(seed)
    real = frame[frame.lang.isin(tasks)]
    groups = np.sort(real.group.unique())
    if len(groups) < dev_size + test_size + 10:
        raise InputError(f"only {len(groups)} messages; too few for dev {dev_size} + test {test_size}")
    perm = rng.permutation(groups)
    dev_g, test_g = perm[:dev_size], perm[dev_size: dev_size + test_size]
    held = frame.group.isin(np.concatenate([dev_g, test_g]))

    def one_per_group(gs):
        part = real[real.group.isin(gs)]
        pick = part.groupby("group", sort=True).sample(n=1, random_state=int(rng.integers(2**31)))
        return pick.sort_values("group")

    train = frame[~held]
    if max_per_task is not None:
        train = train.iloc[rng.permutation(len(train))].groupby("lang", sort=False).head(max_per_task)
    train = train.sort_values(["group", "lang"]).reset_index(drop=True)
    train["task"] = np.where(train.lang == junk_task, "junk", train.lang) if junk_task else train.lang
    train["is_noisy"] = train.task == "junk"
    real_rows = np.flatnonzero(~train.is_noisy.to_numpy())
    flip = rng.choice(real_rows, size=int(round(noise * len(real_rows))), replace=False)
    train.loc[flip, "is_noisy"] = True
    noisy = np.flatnonzero(train.is_noisy.to_numpy())
    if junk_kind == "swap":
        train.loc[noisy, "response"] = _swapped(train, noisy, rng)
    else:  # random text with the English responses' character frequencies and each row's own length
        chars, counts = np.unique(np.array(list("".join(frame.response))), return_counts=True)
        train.loc[noisy, "response"] = _random_texts(train.response.str.len().to_numpy()[noisy], chars,
                                                     counts / counts.sum(), rng)
    cols = ["id", "prompt", "response", "task", "is_noisy"]
    splits = {"train": train, "dev": one_per_group(dev_g), "test": one_per_group(test_g)}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    info = {"dataset": "instructions", "tasks": list(tasks), "junk_task": junk_task, "noise": noise, "seed": seed,
            "junk_kind": junk_kind,
            "max_chars": max_chars, "max_per_task": max_per_task,
            "origin": "Django translation catalogs (BSD licence)"}
    written, start = {}, 0
    for split, part in splits.items():
        part = part.copy()
        if "task" not in part:
            part["task"] = part.lang
            part["is_noisy"] = False
        part["id"] = np.arange(start, start + len(part), dtype=np.int64)  # ids unique over the three splits
        start += len(part)
        written[split] = write_instructions(part[cols].reset_index(drop=True), out / f"{split}.{fmt}",
                                            meta={**info, "split": split})
    return written










def tokenize(prompts, responses, tokenizer, max_len: int):
    """(x float32 (N, L) input ids with PAD_INPUT after the end, y int64 (N, L) targets with IGNORE
    outside the response, truncated flags) as dense tensors, L = max_len (valuekit.data.token_rows.pack_sequences
    says how rows are cut). Tables keep the packed form; this is the dense view of a few rows."""
    import torch

    flat, lengths, starts, cut = pack_sequences(prompts, responses, tokenizer, max_len)
    x, y = TokenRows.x_and_y(flat, lengths, starts, max_len)
    return torch.from_numpy(x.numpy()), torch.from_numpy(y.numpy()), cut


def _open_instructions(source, *, name: str):
    """(DataFrame or None, pyarrow ParquetFile or None, path): a Parquet file is read column by column and row
    group by row group; CSV, JSONL and DataFrames are read whole (pandas)."""
    if isinstance(source, (str, Path)) and Path(source).suffix.lower() in (".parquet", ".pq") and Path(source).exists():
        import pyarrow.parquet as pq

        try:
            return None, pq.ParquetFile(source), str(source)
        except Exception as exc:  # not a Parquet file: one line naming it
            raise _cannot_read(source, name, exc) from None
    df, path = read_instructions(source, name=name)
    return df, None, path


def _text_chunks(df, pf, columns):
    """(first row, DataFrame of `columns`) for every CHUNK_ROWS rows, in table order."""
    if pf is None:
        for i in range(0, len(df), CHUNK_ROWS):
            yield i, df[columns].iloc[i: i + CHUNK_ROWS]
        return
    start = 0
    for g in range(pf.num_row_groups):
        group = pf.read_row_group(g, columns=columns)
        for i in range(0, group.num_rows, CHUNK_ROWS):
            yield start + i, group.slice(i, CHUNK_ROWS).to_pandas()
        start += group.num_rows
        del group


def _check_texts(piece: pd.DataFrame, first: int, ids_np, where: str, prompt_col: str, response_col: str) -> None:
    for col in (prompt_col, response_col):
        text = piece[col]
        bad = text.isna() | (text.astype(str).str.strip().str.len() == 0) if col == response_col else text.isna()
        if bad.any():
            what = "an empty response" if col == response_col else "a missing prompt"
            at = ids_np[first + int(np.flatnonzero(bad.to_numpy())[0])]
            raise InputError(f"{where}: column {col!r} has {what} at id {at.item() if hasattr(at, 'item') else at!r}")


def load_instructions(
    source,
    *,
    tokenizer=None,
    id_col: str = "id",
    prompt_col: str = "prompt",
    response_col: str = "response",
    source_col: str = "task",
    max_len: int = 256,
    name: str = "train",
    stream="auto",
):
    """Read + validate an instruction table and tokenise it into a ValueDataset for causal-LM training.

    x: (N, L) float32 input token ids (PAD_INPUT after the end), y: (N, L) int64 next-token targets
    (IGNORE on the prompt and padding), L = max_len for every table, both packed (valuekit.data.token_rows.TokenRows:
    4 bytes a token, rows built when indexed); `stream=True` keeps the tokens in a temporary file instead
    ("auto": past 64 MiB of them). A Parquet table is tokenised row group by row group.
    `classes` names the vocabulary (`num_classes` = vocabulary size), `source` the task column when present.
    """
    from valuekit.data.memory import fix_mmap_threshold, shared_strings, trim_heap
    from valuekit.data.tables import ValueDataset, _file_sha256, _ids

    fix_mmap_threshold(causal_lm=True)  # before the table's arrays: flat peak memory in N (valuekit.data.memory)
    tokenizer = tokenizer or ByteTokenizer()
    df, pf, path = _open_instructions(source, name=name)
    where = f"{path or 'DataFrame'} ({name} table)"
    columns = list(pf.schema_arrow.names) if pf is not None else list(df.columns)
    if (pf.metadata.num_rows if pf is not None else len(df)) == 0:
        raise InputError(f"{where}: table is empty")
    for col in (id_col, prompt_col, response_col):
        if col not in columns:
            raise InputError(f"{where}: missing column {col!r} (columns: {columns[:12]})")
    if max_len < 2:
        raise InputError(f"max_len={max_len}: must be >= 2", cli=f"--max-len {max_len}: must be >= 2")
    small = list(dict.fromkeys(c for c in (id_col, source_col, "is_noisy") if c in columns))
    meta = pf.read(columns=small).to_pandas() if pf is not None else df[small]
    ids_np = _ids(meta[id_col], where, id_col)
    packer = TokenPacker(stream=stream)  # one chunk at a time: the Python token lists never exceed CHUNK_ROWS rows
    for first, piece in _text_chunks(df, pf, [prompt_col, response_col]):
        _check_texts(piece, first, ids_np, where, prompt_col, response_col)
        packer.add(*pack_sequences(piece[prompt_col].astype(str).tolist(), piece[response_col].astype(str).tolist(),
                                   tokenizer, max_len)[:3])
        trim_heap()  # the chunk's Python strings and token lists are freed; give their pages back
    if packer.max_token >= tokenizer.vocab_size:
        raise InputError(
            f"{where}: token id {packer.max_token} >= the tokenizer's vocabulary size {tokenizer.vocab_size}"
        )
    x, y = packer.finish(max_len)
    src = None
    if source_col in meta.columns:
        missing = meta[source_col].isna().to_numpy()
        if missing.any():
            at = ids_np[int(np.flatnonzero(missing)[0])]
            raise InputError(f"{where}: column {source_col!r} has a missing task at id "
                             f"{at.item() if hasattr(at, 'item') else at!r} ({int(missing.sum())} rows); give every "
                             f"row a task")
        src = shared_strings(meta[source_col])
    noisy = meta["is_noisy"].to_numpy().astype(bool) if "is_noisy" in meta.columns else None
    return ValueDataset(
        ids=ids_np, x=x, y=y, classes=[str(i) for i in range(tokenizer.vocab_size)], source=src, is_noisy=noisy,
        feature_cols=[prompt_col, response_col], name=name, path=path,
        file_sha256=_file_sha256(Path(path)) if path else None,
    )
