"""Weighted and pruned copies of the user's table (`valuekit score`).

The output is the input table, every column, type and row order kept, plus `weight`
(normalised to mean 1 over all input rows), `value`, `value_std`, `rank` (1 = most valuable;
rows the run never valued, value NaN, rank last) and, when a selection rule is given,
`selected`. Rows are matched to the run's `values.parquet` by id. `rank_by` ranks and selects by
another numeric column of `values.parquet` (e.g. DDS's `mean_reward`) instead of `value`.

Files larger than memory work because the export makes two passes: pass 1 reads only the id
column and computes weight, rank and selection over the whole table with numpy; pass 2 streams
every column in Arrow record batches (`ParquetFile.iter_batches`, `pyarrow.csv.open_csv`),
appends the new columns and writes with a `ParquetWriter`/`CSVWriter` into a hidden temporary
file in the output folder that is renamed over the output only when complete.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from valuekit.errors import InputError, refusal, unreadable
from valuekit.export.tablestream import (
    PARQUET_SUFFIXES,
    _csv_unwritable,
    _CsvSource,
    _FileSink,
    _FrameSource,
    _MemorySink,
    _open_source,
    _Restart,
)
from valuekit.ranking import mean_one, rank_by_value
from valuekit.runs.paths import refuse_existing
from valuekit.runs.reader import open_run

ADDED = ("weight", "value", "value_std", "rank", "selected")
OUT_SUFFIXES = (*PARQUET_SUFFIXES, ".csv")
DEFAULT_BATCH_ROWS = 131_072
_SHOW_IDS = 5


@dataclass
class ScoreSummary:
    """What `write_scored` wrote: the output path, input and output row counts, selected count."""

    path: Path
    rows_in: int
    rows_out: int
    selected: int | None
    starved: list | None = None  # classes kept at < half their share (rows of `class_shares`), when labels are known


@dataclass
class _Plan:
    """Pass 1 result: the added columns over every input row, in input row order."""

    weight: np.ndarray
    value: np.ndarray
    value_std: np.ndarray
    rank: np.ndarray
    selected: np.ndarray | None


# ---------------------------------------------------------------- pass 1: ids -> plan


@dataclass(frozen=True)
class Selection:
    """Which rows an export marks `selected` (and, with `subset_only`, keeps): at most one rule of
    `keep_fraction` (the top fraction by value), `top_k`, `drop_fraction` (drop the lowest fraction) or
    `min_weight`; `per_class` applies the keep/top-k/drop rule inside every class (`class_quotas`)."""

    keep_fraction: float | None = None
    top_k: int | None = None
    drop_fraction: float | None = None
    min_weight: float | None = None
    subset_only: bool = False
    per_class: bool = False

    @property
    def has_rule(self) -> bool:
        return any(r is not None for r in (self.keep_fraction, self.top_k, self.drop_fraction, self.min_weight))

    def check(self) -> Selection:
        """The selection itself when at most one rule is given and it is in range, else InputError (the message
        names the argument; its `cli` form the flag)."""
        named = [(arg, v) for arg, v in (("keep_fraction", self.keep_fraction), ("top_k", self.top_k),
                                         ("drop_fraction", self.drop_fraction), ("min_weight", self.min_weight))
                 if v is not None]
        if len(named) > 1:
            raise InputError("give at most one of keep_fraction, top_k, drop_fraction, min_weight",
                             cli="give at most one of --keep-fraction, --top-k, --drop-fraction, --min-weight")
        bad = None
        if self.keep_fraction is not None and not (0 < self.keep_fraction <= 1):
            bad = ("keep_fraction", self.keep_fraction, "must be in (0, 1]")
        elif self.top_k is not None and not (1 <= self.top_k):
            bad = ("top_k", self.top_k, "must be >= 1")
        elif self.drop_fraction is not None and not (0 <= self.drop_fraction < 1):
            bad = ("drop_fraction", self.drop_fraction, "must be in [0, 1)")
        elif self.min_weight is not None and not math.isfinite(self.min_weight):
            bad = ("min_weight", self.min_weight, "must be a finite number")
        if bad:
            arg, value, rule = bad
            raise InputError(f"{arg}={value}: {rule}", cli=f"--{arg.replace('_', '-')} {value}: {rule}")
        if self.per_class and self.keep_fraction is None and self.top_k is None and self.drop_fraction is None:
            raise InputError("per_class=True needs keep_fraction, top_k or drop_fraction (the rule applied in each "
                             "class)", cli="--per-class needs --keep-fraction, --top-k or --drop-fraction (the rule "
                             "applied in each class)")
        if self.subset_only and not self.has_rule:
            raise InputError("subset_only=True needs a selection rule (keep_fraction, top_k, drop_fraction or "
                             "min_weight)", cli="--subset-only needs a selection rule (--keep-fraction, --top-k, "
                             "--drop-fraction or --min-weight)")
        return self


def check_rank_by(run, rank_by: str) -> None:
    """`rank_by` must name a numeric column of the run's values.parquet other than the id and `rank` (ascending)."""
    path = run.checked_values_path()
    if rank_by == "value" or path is None:  # a run without values.parquet fails later with its own message
        return
    schema = pq.read_schema(path)
    numeric = [f.name for f in schema if f.name not in ("example_id", "rank")
               and (pa.types.is_floating(f.type) or pa.types.is_integer(f.type))]
    if rank_by not in numeric:
        what = "is not numeric" if rank_by in schema.names else "has no such column"
        tail = f"{path} {what} (numeric columns: {', '.join(numeric)})"
        raise InputError(f"rank_by={rank_by!r}: {tail}", cli=f"--rank-by {rank_by}: {tail}")


def missing_in_column(run_dir, column: str) -> tuple[int, int]:
    """(rows of the run's values.parquet whose `column` is NaN or null, all rows): rows `--rank-by` puts last."""
    path = open_run(run_dir).checked_values_path()
    if path is None:
        return 0, 0
    col = _values_column(path, column).to_numpy().astype(np.float64, copy=False)
    return int(np.isnan(col).sum()), len(col)


def _normalise_ids(ids: pa.Array, where: str, id_col: str) -> pa.Array:
    if pa.types.is_dictionary(ids.type):
        ids = ids.dictionary_decode()
    if pa.types.is_integer(ids.type):
        ids = ids.cast(pa.int64())
    elif pa.types.is_string(ids.type) or pa.types.is_large_string(ids.type):
        ids = ids.cast(pa.large_string())
    else:
        raise InputError(f"{where}: column {id_col!r} has type {ids.type}; ids must be integers or strings")
    if ids.null_count:
        row = int(np.flatnonzero(ids.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{where}: column {id_col!r} has a null id at row {row}")
    return ids


def _show(values) -> str:
    return ", ".join(repr(v) for v in values)


# ---------------------------------------------------------------- per-class (stratified) selection


def class_quotas(counts, *, keep_fraction=None, top_k=None, drop_fraction=None) -> np.ndarray:
    """Rows to keep from each class so that a selection keeps every class at its share.

    keep_fraction f: max(1, round(f * n_c)) (never empties a class); drop_fraction d: n_c - round(d * n_c);
    top_k K: K split over the classes in proportion to n_c by largest remainders (ties: lower class
    index first), capped at n_c. Rounding is half up, as for the global rules.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if keep_fraction is not None:
        return np.minimum(counts, np.maximum(1, np.floor(keep_fraction * counts + 0.5).astype(np.int64)))
    if drop_fraction is not None:
        return counts - np.floor(drop_fraction * counts + 0.5).astype(np.int64)
    k = min(int(top_k), int(counts.sum()))
    exact = k * counts / counts.sum()
    q = np.floor(exact).astype(np.int64)
    order = np.lexsort((np.arange(len(counts)), -(exact - q)))  # largest remainder first, then class order
    for c in order[: k - int(q.sum())]:
        q[c] += 1
    return np.minimum(q, counts)


def select_per_class(value, labels, *, keep_fraction=None, top_k=None, drop_fraction=None) -> np.ndarray:
    """Boolean mask: within each class (distinct entry of `labels`), its `class_quotas` rows of highest value
    (NaN last, ties by row order, as `rank`)."""
    value = np.asarray(value, dtype=np.float64)
    codes, _ = pd.factorize(pd.Series(labels), sort=True)
    counts = np.bincount(codes)
    quota = class_quotas(counts, keep_fraction=keep_fraction, top_k=top_k, drop_fraction=drop_fraction)
    rank = rank_by_value(value)  # global rank: its order restricted to a class is the class's order
    order = np.lexsort((rank, codes))  # by class, then rank
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    pos_in_class = np.empty(len(value), dtype=np.int64)
    pos_in_class[order] = np.arange(len(value)) - np.repeat(starts, counts)
    return pos_in_class < quota[codes]


def select_top(value, k: int, *, labels=None, fraction: float | None = None) -> np.ndarray:
    """Mask of the top rows by value: the global top `k`, or with `labels` the per-class top `fraction`."""
    if labels is None:
        return rank_by_value(np.asarray(value, dtype=np.float64)) <= k
    return select_per_class(value, labels, keep_fraction=fraction)


def class_shares(selected, labels) -> pd.DataFrame:
    """Per class: rows, rows kept, share among kept / share among all (1 = kept at its share); sorted by ratio."""
    codes, names = pd.factorize(pd.Series(labels), sort=True)
    sel = np.asarray(selected, dtype=bool)
    n = np.bincount(codes, minlength=len(names))
    kept = np.bincount(codes[sel], minlength=len(names))
    ratio = (kept / max(int(sel.sum()), 1)) / (n / len(codes))
    frame = pd.DataFrame({"label": list(names), "rows": n, "kept": kept, "share_ratio": ratio})
    return frame.sort_values("share_ratio", kind="stable", ignore_index=True)


def starved_classes(selected, labels, *, below: float = 0.5) -> pd.DataFrame:
    """Classes whose share among the selected rows is under `below` times their share among all rows."""
    shares = class_shares(selected, labels)
    return shares[shares.share_ratio < below].reset_index(drop=True)


def _labels_of(source, label_col: str) -> np.ndarray:
    """The label column of the table being scored (for --per-class), as a numpy array; no nulls."""
    if label_col not in source.schema.names:
        raise refusal(f"{source.where}: --per-class needs the label column {label_col!r} "
                         f"(choose it with --label-col; columns: {source.schema.names[:12]})")
    col = source.ids(label_col)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    if col.null_count:
        row = int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])
        raise refusal(f"{source.where}: column {label_col!r} has a null label at row {row} (--per-class)")
    return col.to_numpy(zero_copy_only=False)


def _sha256(path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _as_text(values) -> np.ndarray:
    """Labels as the text run.json's `classes` holds (integral floats such as 3.0 as '3')."""
    out = []
    for v in values:
        if isinstance(v, (float, np.floating)) and float(v).is_integer():
            v = int(v)
        out.append(str(v))
    return np.asarray(out, dtype=object)


def check_table(source, run, *, id_col: str, label_col: str) -> str | None:
    """Is `source` (whose ids are all in the run: `_plan` checked) the table `run` was trained on, or rows of it?
    The file's sha256 against run.json's `data.train.file_sha256` first; otherwise its labels against the run's
    classes and, id by id, against the
    labels the run logged in steps/. Refuses (InputError, one line) a table whose labels are not the run's classes
    or differ from the run's for more than half of the rows; returns a one-line warning when the file differs
    but its labels match (or differ for a few rows: a relabelled copy), else None."""
    train = (run.meta.get("data") or {}).get("train") or {}
    sha = train.get("file_sha256")
    if source.path is not None and sha and _sha256(source.path) == sha:
        return None
    classes = [str(c) for c in run.meta.get("classes") or []]
    differs = (f"{source.where}: not the file run {run.path} was trained on (its sha256 differs from run.json's)"
               if source.path is not None and sha else None)
    if not classes or label_col not in source.schema.names:
        return differs and differs + "; scored by id"
    col = source.ids(label_col)
    if pa.types.is_dictionary(col.type):
        col = col.dictionary_decode()
    labels = _as_text(col.to_pylist())
    known = set(classes)
    strange = [v for v in dict.fromkeys(labels) if v not in known]
    if strange:
        raise InputError(f"{source.where}: column {label_col!r} has label {strange[0]!r}, which is not a class of run "
                         f"{run.path} ({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}); is this the "
                         f"table the run was trained on?")
    from valuekit.runs.reader import example_labels

    logged = example_labels(run)
    if len(logged):
        ids = _normalise_ids(source.ids(id_col), source.where, id_col).to_pylist()
        by_id = dict(zip(logged["example_id"].astype(str), np.asarray(classes, dtype=object)[logged["label"]]))
        pairs = [(i, t, by_id.get(str(i))) for i, t in zip(ids, labels)]
        wrong = [(i, t, r) for i, t, r in pairs if r is not None and r != t]
        seen = sum(r is not None for _, _, r in pairs)
        if wrong and 2 * len(wrong) > seen:
            i, t, r = wrong[0]
            raise InputError(f"{source.where}: {len(wrong)} of {seen} rows have another {label_col!r} than run "
                             f"{run.path} was trained with (first: id {i!r}: {t!r} here, {r!r} in the run); is this "
                             f"the table the run was trained on?")
        if wrong:
            return (f"{source.where}: {len(wrong)} of {seen} rows have another {label_col!r} than run {run.path} was "
                    f"trained with (a relabelled copy?); values are those of the run's labels")
    return differs and differs + "; its ids and labels match the run's, so it is scored"


def _say(note: str | None) -> None:
    if note:
        import sys

        print(f"valuekit: warning: {note}", file=sys.stderr)


def _values_column(values_path: Path, name: str) -> pa.ChunkedArray:
    """One column of values.parquet (schema checked by Run.checked_values_path); damaged pages -> one line."""
    try:
        return pq.read_table(values_path, columns=[name]).column(0)
    except Exception as exc:
        raise unreadable(values_path, exc) from None


def _plan(ids: pa.Array, run, *, where: str, id_col: str, selection: Selection, labels=None,
          rank_by: str = "value") -> _Plan:
    """Pass 1: match the table's ids to the run's values.parquet; weight, rank and selection (by the
    `rank_by` column) over all rows."""
    values_path = run.checked_values_path() or run.values_path
    if not values_path.exists():
        raise InputError(f"{run.path}: run has no values.parquet (status {run.meta.get('status')!r}); "
                         "finish it with resume=True")
    n = len(ids)
    if n == 0:
        raise InputError(f"{where}: table is empty")
    ids = _normalise_ids(ids, where, id_col)
    vid = _values_column(values_path, "example_id").combine_chunks()
    vid = vid.cast(pa.int64()) if pa.types.is_integer(vid.type) else vid.cast(pa.large_string())
    if vid.type != ids.type:  # int ids on one side, text on the other: compare as text
        ids, vid = ids.cast(pa.large_string()), vid.cast(pa.large_string())

    if len(ids) == len(vid) and ids.equals(vid):
        pos = None  # the usual case: the table the run was trained on, in the same order
    else:
        found = pc.index_in(ids, value_set=vid)
        if found.null_count:
            missing = ids.filter(found.is_null())
            raise InputError(
                f"{where}: {len(missing)} id(s) in column {id_col!r} are not in run {run.path} "
                f"(first: {_show(missing.slice(0, _SHOW_IDS).to_pylist())})"
            )
        pos = found.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        # Run ids are unique, so a repeated table id shows up as a repeated position.
        counts = np.bincount(pos, minlength=len(vid))
        if counts.max() > 1:
            raise InputError(f"{where}: column {id_col!r} has duplicate id {vid[int(counts.argmax())].as_py()!r} "
                             f"({int((counts[counts > 1] - 1).sum())} duplicates)")
        del counts
    del vid, ids

    def gather(name: str) -> np.ndarray:
        # One column at a time keeps pass 1 at a few arrays of N numbers.
        a = _values_column(values_path, name).to_numpy().astype(np.float64, copy=False)
        return a if pos is None else a[pos]

    value, value_std, weight = gather("value"), gather("value_std"), gather("weight")
    key = value if rank_by == "value" else gather(rank_by)
    pos = None  # the row positions are no longer needed
    bad = ~np.isfinite(weight) | (weight < 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"{values_path}: column 'weight' has value {weight[row]!r} (table row {row}); "
                         "weights must be finite and >= 0")
    weight = mean_one(weight)
    rank = rank_by_value(key)
    selected = None
    keep_fraction, top_k, drop_fraction = selection.keep_fraction, selection.top_k, selection.drop_fraction
    if selection.min_weight is not None:
        selected = weight >= selection.min_weight
    elif keep_fraction is not None or top_k is not None or drop_fraction is not None:
        if keep_fraction is not None:
            k = max(1, int(math.floor(keep_fraction * n + 0.5)))
        elif top_k is not None:
            k = min(int(top_k), n)
        elif drop_fraction is not None:
            k = n - int(math.floor(drop_fraction * n + 0.5))
        if labels is not None:  # --per-class: the same rule inside every class
            selected = select_per_class(key, labels, keep_fraction=keep_fraction, top_k=top_k,
                                        drop_fraction=drop_fraction)
        else:
            selected = rank <= k
    return _Plan(weight, value, value_std, rank, selected)


# ---------------------------------------------------------------- pass 2: stream and write


def _out_schema(schema: pa.Schema, with_selected: bool) -> pa.Schema:
    added = [pa.field("weight", pa.float64()), pa.field("value", pa.float64()),
             pa.field("value_std", pa.float64()), pa.field("rank", pa.int64())]
    if with_selected:
        added.append(pa.field("selected", pa.bool_()))
    return pa.schema(list(schema) + added, metadata=schema.metadata)


def _extend(batch: pa.RecordBatch, plan: _Plan, start: int, schema: pa.Schema, subset_only: bool) -> pa.RecordBatch:
    """Append the added columns for rows start..start+len(batch) (and drop unselected rows for a subset)."""
    end = start + batch.num_rows
    cols = list(batch.columns) + [pa.array(plan.weight[start:end]), pa.array(plan.value[start:end]),
                                  pa.array(plan.value_std[start:end]), pa.array(plan.rank[start:end])]
    if plan.selected is not None:
        sel = pa.array(plan.selected[start:end])
        cols.append(sel)
    out = pa.RecordBatch.from_arrays(cols, schema=schema)
    return out.filter(sel) if subset_only else out


def _without(schema: pa.Schema, drop) -> pa.Schema:
    return pa.schema([f for f in schema if f.name not in drop], metadata=schema.metadata) if drop else schema


def _stream(source, plan: _Plan, *, n: int, batch_rows: int, subset_only: bool, sink, progress: bool, drop=()):
    """Pass 2: write every extended batch (without the columns in `drop`), in row order, to `sink(schema)`;
    return `sink.finish()`."""
    from tqdm.auto import tqdm

    with_selected = plan.selected is not None
    for _ in range(2 * len(source.schema) + 8):
        writer = None
        try:
            with tqdm(total=n, unit="row", desc="score", disable=None if progress else True) as bar:
                start = 0
                for batch in source.batches(batch_rows):
                    if drop:
                        batch = batch.drop_columns(list(drop))
                    if writer is None:  # a CSV source knows its final schema only once it streams
                        out_schema = _out_schema(_without(source.schema, drop), with_selected)
                        writer = sink(out_schema)
                    if start + batch.num_rows > n:
                        raise InputError(f"{source.where}: has more than {n} rows in pass 2 but {n} ids in pass 1; "
                                         "was the file changed while scoring?")
                    writer.write(_extend(batch, plan, start, out_schema, subset_only))
                    start += batch.num_rows
                    bar.update(batch.num_rows)
            if writer is None:
                writer = sink(_out_schema(_without(source.schema, drop), with_selected))
            if start != n:
                raise InputError(f"{source.where}: has {start} rows in pass 2 but {n} ids in pass 1; "
                                 "was the file changed while scoring?")
        except _Restart:
            if writer is not None:
                writer.abort()
            continue
        except BaseException:
            if writer is not None:
                writer.abort()
            raise
        return writer.finish()
    raise InputError(f"{source.where}: column types kept changing while streaming; convert it to Parquet first")


# ---------------------------------------------------------------- public


def _check_out(out, source, run, overwrite: bool) -> Path:
    out = Path(out)
    if out.suffix.lower() not in OUT_SUFFIXES:
        raise InputError(f"-o {out}: output must end in .parquet or .csv")
    if out.is_dir():
        raise InputError(f"-o {out}: is a directory; give a file name ending in .parquet or .csv")
    protected = [p for p in (source.path, run.values_path) if p is not None]
    for p in protected:
        if out.resolve() == Path(p).resolve() or (out.exists() and Path(p).exists() and os.path.samefile(out, p)):
            what = "the input table" if p == source.path else "the run's values file"
            raise InputError(f"-o {out}: is {what}; valuekit never overwrites its input")
    if out.resolve().is_relative_to(Path(run.path).resolve()):
        raise InputError(f"-o {out}: lies in the run directory {run.path}; write outputs elsewhere")
    refuse_existing(out, overwrite=overwrite)
    return out


def _prepare(table, run_dir, *, out, id_col, selection: Selection, batch_rows, rank_by="value", drop_columns=(),
             overwrite: bool = False):
    selection.check()
    if not (isinstance(batch_rows, int) and batch_rows >= 1):
        raise InputError(f"batch_rows={batch_rows!r}: must be an integer >= 1",
                         cli=f"--batch-rows {batch_rows}: must be an integer >= 1")
    run = open_run(run_dir)
    check_rank_by(run, rank_by)
    csv_out = out is not None and Path(out).suffix.lower() == ".csv"
    source = _open_source(table, for_csv_out=csv_out, frame_out=out is None)
    if out is not None:
        out = _check_out(out, source, run, overwrite)
    names = source.schema.names
    if id_col not in names:
        raise refusal(f"{source.where}: missing column {id_col!r} "
                         f"(choose another with --id-col; columns: {names[:12]})")
    clash = [c for c in ADDED if c in names]
    if clash:
        raise InputError(f"{source.where}: already has column {clash[0]!r}, which score adds; rename it first")
    unknown = [c for c in drop_columns if c not in names]
    if unknown:
        raise InputError(f"{source.where}: drop_columns names {unknown[0]!r}, which is not a column "
                         f"(columns: {names[:12]})",
                         cli=f"--drop-columns {unknown[0]}: {source.where} has no such column (columns: {names[:12]})")
    if csv_out:
        problem = _csv_unwritable(_without(source.schema, drop_columns))
        if problem:
            col = problem.split("'")[1]
            raise InputError(f"{source.where}: {problem}, or leave the column out with drop_columns=[{col!r}]",
                             cli=f"{source.where}: {problem}, or leave the column out with --drop-columns {col}")
    return run, source, out


def write_scored(table, run_dir, out, *, selection: Selection = Selection(), id_col: str = "id",
                 batch_rows: int = DEFAULT_BATCH_ROWS, progress: bool = False, label_col: str = "label",
                 rank_by: str = "value", drop_columns=(), overwrite: bool = False) -> ScoreSummary:
    """Stream `table` (path, DataFrame or Arrow table) into `out` (.parquet/.csv) with the run's values added.
    An existing `out` is refused unless `overwrite=True` (an input table or run file never is replaced).

    Memory holds the id column and five numbers per row, plus one batch of `batch_rows` rows.
    `drop_columns` (names) are left out of `out` (e.g. an image column that CSV cannot hold).
    """
    drop_columns = _names(drop_columns)
    run, source, out = _prepare(table, run_dir, out=out, id_col=id_col, selection=selection, batch_rows=batch_rows,
                                rank_by=rank_by, drop_columns=drop_columns, overwrite=overwrite)
    try:
        plan = _plan(source.ids(id_col), run, where=source.where, id_col=id_col, selection=selection,
                     labels=_labels_of(source, label_col) if selection.per_class else None, rank_by=rank_by)
        _say(check_table(source, run, id_col=id_col, label_col=label_col))  # after the ids are known to be the run's
        pa.default_memory_pool().release_unused()  # hand pass 1's Arrow buffers back before streaming
        n = len(plan.weight)
        if isinstance(source, _CsvSource):
            source.set_batch_rows(batch_rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = _stream(source, plan, n=n, batch_rows=batch_rows, subset_only=selection.subset_only,
                       sink=lambda schema: _FileSink(out, schema), progress=progress, drop=drop_columns)
        starved = None
        if plan.selected is not None and label_col in source.schema.names:
            starved = starved_classes(plan.selected, _labels_of(source, label_col)).to_dict("records")
    finally:
        source.close()
    return ScoreSummary(out, n, rows, None if plan.selected is None else int(plan.selected.sum()), starved)


def score(
    table,
    run_dir,
    *,
    out=None,
    id_col: str = "id",
    keep_fraction: float | None = None,
    top_k: int | None = None,
    drop_fraction: float | None = None,
    min_weight: float | None = None,
    subset_only: bool = False,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: bool = False,
    per_class: bool = False,
    label_col: str = "label",
    rank_by: str = "value",
    drop_columns=(),
    overwrite: bool = False,
) -> pd.DataFrame | Path:
    """Join a run's values onto `table` by id; return a DataFrame, or stream into `out` and return its path.

    `table` is a .parquet/.csv path, a pandas DataFrame or a pyarrow Table. Added columns: `weight`
    (mean 1 over all input rows, ready for `sample_weight=` or `WeightedRandomSampler`), `value`,
    `value_std`, `rank` (1 = most valuable, NaN values last) and, with one of `keep_fraction`
    (top fraction by value), `top_k`, `drop_fraction` (drop the lowest fraction) or `min_weight`,
    a boolean `selected`; `subset_only=True` keeps just the selected rows. `per_class=True` applies
    the keep/top-k/drop rule inside every class of the table's `label_col` (`class_quotas`), so no
    class is starved. `rank_by` ranks and selects by another numeric column of the run's values.parquet
    (e.g. `mean_reward`; `value` stays the method's value). A DataFrame input comes back as a DataFrame
    with its own dtypes and index. `drop_columns` (a list of names) leaves those columns out of the result
    (e.g. a list-valued image column, which a .csv `out` cannot hold). An existing `out` is refused unless
    `overwrite=True`, so a notebook cell that writes a file can be run again with it; the input table never is
    replaced.
    """
    drop_columns = _names(drop_columns)
    selection = Selection(keep_fraction=keep_fraction, top_k=top_k, drop_fraction=drop_fraction,
                          min_weight=min_weight, subset_only=subset_only, per_class=per_class)
    if out is not None:
        return write_scored(table, run_dir, out, selection=selection, id_col=id_col, batch_rows=batch_rows,
                            progress=progress, label_col=label_col, rank_by=rank_by, drop_columns=drop_columns,
                            overwrite=overwrite).path
    run, source, _ = _prepare(table, run_dir, out=None, id_col=id_col, selection=selection, batch_rows=batch_rows,
                              rank_by=rank_by, drop_columns=drop_columns)
    try:
        plan = _plan(source.ids(id_col), run, where=source.where, id_col=id_col, selection=selection,
                     labels=_labels_of(source, label_col) if per_class else None, rank_by=rank_by)
        _say(check_table(source, run, id_col=id_col, label_col=label_col))  # after the ids are known to be the run's
        if isinstance(source, _FrameSource):
            return _frame_result(table.drop(columns=list(drop_columns)), plan, subset_only)
        if isinstance(source, _CsvSource):
            source.set_batch_rows(batch_rows)
        t = _stream(source, plan, n=len(plan.weight), batch_rows=batch_rows, subset_only=subset_only,
                    sink=_MemorySink, progress=progress, drop=drop_columns)
    finally:
        source.close()
    return t.to_pandas()


def _names(columns) -> tuple[str, ...]:
    """drop_columns as a tuple of names (a single name or a comma-separated string is accepted too)."""
    if columns is None:
        return ()
    if isinstance(columns, str):
        columns = columns.split(",")
    return tuple(str(c).strip() for c in columns if str(c).strip())


def _frame_result(df: pd.DataFrame, plan: _Plan, subset_only: bool) -> pd.DataFrame:
    """Stay in pandas so every dtype (nullable, categorical, object) and the index come back as given."""
    added = {"weight": plan.weight, "value": plan.value, "value_std": plan.value_std, "rank": plan.rank}
    if plan.selected is not None:
        added["selected"] = plan.selected
    res = df.assign(**added)
    return res[plan.selected] if subset_only else res
