"""Weighted and pruned copies of the user's table (`valuekit score`).

The output is the input table, every column, type and row order kept, plus `weight`
(normalised to mean 1 over all input rows), `value`, `value_std`, `rank` (1 = most valuable;
rows the run never valued, value NaN, rank last) and, when a selection rule is given,
`selected`. Rows are matched to the run's `values.parquet` by id.

Files larger than memory work because the export makes two passes: pass 1 reads only the id
column and computes weight, rank and selection over the whole table with numpy; pass 2 streams
every column in Arrow record batches (`ParquetFile.iter_batches`, `pyarrow.csv.open_csv`),
appends the new columns and writes with a `ParquetWriter`/`CSVWriter` into a hidden temporary
file in the output folder that is renamed over the output only when complete.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from valuekit.errors import InputError
from valuekit.runlog import commit, mean_one, rank_by_value, read_run, temp_path

ADDED = ("weight", "value", "value_std", "rank", "selected")
PARQUET_SUFFIXES = (".parquet", ".pq")
OUT_SUFFIXES = (*PARQUET_SUFFIXES, ".csv")
DEFAULT_BATCH_ROWS = 131_072
_ROW_GROUP_ROWS = 1 << 20  # output Parquet row groups: pyarrow's default length ...
_ROW_GROUP_BYTES = 128 << 20  # ... or this much Arrow data, whichever comes first
_CSV_MIN_BLOCK = 1 << 14  # bytes; open_csv needs every row to fit in one block
_CSV_MAX_BLOCK = 1 << 26
_SHOW_IDS = 5


@dataclass
class ScoreSummary:
    """What `write_scored` wrote: the output path, input and output row counts, selected count."""

    path: Path
    rows_in: int
    rows_out: int
    selected: int | None


@dataclass
class _Plan:
    """Pass 1 result: the added columns over every input row, in input row order."""

    weight: np.ndarray
    value: np.ndarray
    value_std: np.ndarray
    rank: np.ndarray
    selected: np.ndarray | None


# ---------------------------------------------------------------- sources (pass 2 streams)


class _Source:
    """What pass 1 and pass 2 need from a table: `schema`, `ids(id_col)`, `batches(batch_rows)`."""

    path: Path | None = None

    def close(self) -> None:
        pass


def _first_line(exc: Exception) -> str:
    s = str(exc).strip()
    return s.splitlines()[0] if s else type(exc).__name__


class _TableSource(_Source):
    """An in-memory Arrow table (a DataFrame converted once)."""

    def __init__(self, table: pa.Table, where: str):
        self.table, self.where, self.path = table, where, None
        self.schema = table.schema
        self.num_rows = table.num_rows

    def ids(self, id_col: str) -> pa.Array:
        return self.table.column(id_col).combine_chunks()

    def batches(self, batch_rows: int):
        yield from self.table.to_batches(max_chunksize=batch_rows)


class _FrameSource(_Source):
    """A DataFrame that comes back as a DataFrame: only its id column goes through Arrow."""

    def __init__(self, df: pd.DataFrame):
        self.df, self.where, self.path = df, "<DataFrame>", None
        self.schema = pa.schema([(str(c), pa.null()) for c in df.columns])  # names only

    def ids(self, id_col: str) -> pa.Array:
        try:
            return pa.array(self.df[id_col], from_pandas=True)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise InputError(
                f"<DataFrame>: column {id_col!r} mixes types or is not int/str ({_first_line(exc)})") from None


class _ParquetSource(_Source):
    def __init__(self, path: Path):
        self.path, self.where = path, str(path)
        try:
            # Without pre-buffering and with a 1 MiB read buffer, memory stays bounded by columns x pages
            # instead of holding a whole compressed row group (hundreds of MB for 1M-row groups).
            self.file = pq.ParquetFile(path, pre_buffer=False, buffer_size=1 << 20)
        except Exception as exc:
            raise InputError(f"{path}: cannot read table ({_first_line(exc)})") from None
        self.schema = self.file.schema_arrow
        self.num_rows = self.file.metadata.num_rows

    def close(self) -> None:
        self.file.close()

    def ids(self, id_col: str) -> pa.Array:
        try:
            return self.file.read(columns=[id_col]).column(0).combine_chunks()
        except Exception as exc:
            raise InputError(f"{self.path}: cannot read column {id_col!r} ({_first_line(exc)})") from None

    def batches(self, batch_rows: int):
        try:
            for batch in self.file.iter_batches(batch_size=batch_rows):
                # Dictionary value types can come back narrower than the file's Arrow schema.
                yield batch if batch.schema.equals(self.schema) else batch.cast(self.schema)
        except (OSError, pa.ArrowException) as exc:
            raise InputError(f"{self.path}: cannot read table ({_first_line(exc)})") from None


class _CsvSource(_Source):
    """A CSV file streamed with `open_csv`.

    `open_csv` fixes column types from its first block while `read_csv` unifies them over the
    whole file; when a later block does not convert, the column's type is taken from a
    `read_csv` of that one column and the stream restarts, so the types match `read_csv`.
    """

    def __init__(self, path: Path):
        self.path, self.where = path, str(path)
        try:
            with pacsv.open_csv(path) as reader:
                self.schema = reader.schema
        except Exception as exc:
            raise InputError(f"{path}: cannot read table ({_first_line(exc)})") from None
        self.names = self.schema.names
        self.column_types: dict[str, pa.DataType] = {}
        self.num_rows = None
        self.block_size = _CSV_MIN_BLOCK

    def ids(self, id_col: str) -> pa.Array:
        try:
            t = pacsv.read_csv(self.path, convert_options=pacsv.ConvertOptions(include_columns=[id_col]))
        except Exception as exc:
            raise InputError(f"{self.path}: cannot read column {id_col!r} ({_first_line(exc)})") from None
        ids = t.column(0).combine_chunks()
        self.column_types[id_col] = ids.type
        self.num_rows = len(ids)
        return ids

    def set_batch_rows(self, batch_rows: int) -> None:
        per_row = os.path.getsize(self.path) / max(self.num_rows or 1, 1)
        self.block_size = int(min(max(batch_rows * per_row, _CSV_MIN_BLOCK), _CSV_MAX_BLOCK))

    def _open(self):
        return pacsv.open_csv(
            self.path,
            read_options=pacsv.ReadOptions(block_size=self.block_size),
            convert_options=pacsv.ConvertOptions(column_types=self.column_types),
        )

    def batches(self, batch_rows: int):
        try:
            reader = self._open()
            self.schema = reader.schema
            with reader:
                for batch in reader:
                    if not batch.schema.equals(self.schema):
                        batch = batch.cast(self.schema)
                    yield batch
        except pa.ArrowInvalid as exc:
            self._fix(exc)
            raise _Restart from None

    def _fix(self, exc: Exception) -> None:
        msg = _first_line(exc)
        if "straddl" in msg and self.block_size < _CSV_MAX_BLOCK * 16:
            self.block_size *= 2
            return
        m = re.search(r"CSV column #(\d+): CSV conversion error to ([^:]+):", msg)
        if m is None or int(m.group(1)) >= len(self.names):
            raise InputError(f"{self.path}: cannot read table ({msg})")
        name = self.names[int(m.group(1))]
        try:
            t = pacsv.read_csv(self.path, convert_options=pacsv.ConvertOptions(include_columns=[name]))
        except Exception as exc2:
            raise InputError(f"{self.path}: cannot read column {name!r} ({_first_line(exc2)})") from None
        new = t.schema.field(0).type
        if self.column_types.get(name) == new:
            raise InputError(f"{self.path}: column {name!r} cannot be read as {new} ({msg})")
        self.column_types[name] = new


class _Restart(Exception):
    """Raised by a source whose column types changed mid-stream; pass 2 starts again."""


def _open_source(table, *, for_csv_out: bool, frame_out: bool = False):
    if isinstance(table, pd.DataFrame) and frame_out:
        return _FrameSource(table)
    if isinstance(table, pd.DataFrame):
        try:
            t = pa.Table.from_pandas(table, preserve_index=None if not for_csv_out else False)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise InputError(f"<DataFrame>: cannot convert to Arrow ({_first_line(exc)})") from None
        return _TableSource(t, "<DataFrame>")
    if isinstance(table, pa.Table):
        return _TableSource(table, "<Arrow table>")
    path = Path(table)
    if not path.exists():
        raise InputError(f"{path}: no such file (table to score)")
    if path.is_dir():
        raise InputError(f"{path}: is a directory, expected a .parquet or .csv file (table to score)")
    suffix = path.suffix.lower()
    if suffix in PARQUET_SUFFIXES:
        return _ParquetSource(path)
    if suffix == ".csv":
        return _CsvSource(path)
    raise InputError(f"{path}: score reads .parquet or .csv tables, not {suffix or '(no extension)'!r}")


# ---------------------------------------------------------------- pass 1: ids -> plan


def check_selection(keep_fraction=None, top_k=None, drop_fraction=None, min_weight=None,
                    subset_only=False) -> bool:
    """Check the selection options (at most one rule, in range); return whether a rule is given."""
    rules = [r for r in (keep_fraction, top_k, drop_fraction, min_weight) if r is not None]
    if len(rules) > 1:
        raise InputError("give at most one of --keep-fraction, --top-k, --drop-fraction, --min-weight")
    if keep_fraction is not None and not (0 < keep_fraction <= 1):
        raise InputError(f"--keep-fraction {keep_fraction}: must be in (0, 1]")
    if top_k is not None and not (1 <= top_k):
        raise InputError(f"--top-k {top_k}: must be >= 1")
    if drop_fraction is not None and not (0 <= drop_fraction < 1):
        raise InputError(f"--drop-fraction {drop_fraction}: must be in [0, 1)")
    if min_weight is not None and not math.isfinite(min_weight):
        raise InputError(f"--min-weight {min_weight}: must be a finite number")
    if subset_only and not rules:
        raise InputError("--subset-only needs a selection rule "
                         "(--keep-fraction, --top-k, --drop-fraction or --min-weight)")
    return bool(rules)


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


def _plan(ids: pa.Array, run, *, where: str, id_col: str, keep_fraction, top_k, drop_fraction, min_weight) -> _Plan:
    """Pass 1: match the table's ids to the run's values.parquet; weight, rank and selection over all rows."""
    values_path = run.values_path
    if not values_path.exists():
        raise InputError(f"{run.path}: run has no values.parquet (status {run.meta.get('status')!r}); "
                         "finish it with --resume")
    n = len(ids)
    if n == 0:
        raise InputError(f"{where}: table is empty")
    ids = _normalise_ids(ids, where, id_col)
    vid = pq.read_table(values_path, columns=["example_id"]).column(0).combine_chunks()
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
        a = pq.read_table(values_path, columns=[name]).column(0).to_numpy().astype(np.float64, copy=False)
        return a if pos is None else a[pos]

    value, value_std, weight = gather("value"), gather("value_std"), gather("weight")
    del pos
    bad = ~np.isfinite(weight) | (weight < 0)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise InputError(f"{values_path}: column 'weight' has value {weight[row]!r} (table row {row}); "
                         "weights must be finite and >= 0")
    weight = mean_one(weight)
    rank = rank_by_value(value)
    selected = None
    if min_weight is not None:
        selected = weight >= min_weight
    elif keep_fraction is not None or top_k is not None or drop_fraction is not None:
        if keep_fraction is not None:
            k = max(1, int(math.floor(keep_fraction * n + 0.5)))
        elif top_k is not None:
            k = min(int(top_k), n)
        else:
            k = n - int(math.floor(drop_fraction * n + 0.5))
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


def _stream(source, plan: _Plan, *, n: int, batch_rows: int, subset_only: bool, sink, progress: bool):
    """Pass 2: write every extended batch, in row order, to `sink(schema)`; return `sink.finish()`."""
    from tqdm.auto import tqdm

    with_selected = plan.selected is not None
    for _ in range(2 * len(source.schema) + 8):
        writer = None
        try:
            with tqdm(total=n, unit="row", desc="score", disable=None if progress else True) as bar:
                start = 0
                for batch in source.batches(batch_rows):
                    if writer is None:  # a CSV source knows its final schema only once it streams
                        out_schema = _out_schema(source.schema, with_selected)
                        writer = sink(out_schema)
                    if start + batch.num_rows > n:
                        raise InputError(f"{source.where}: has more than {n} rows in pass 2 but {n} ids in pass 1; "
                                         "was the file changed while scoring?")
                    writer.write(_extend(batch, plan, start, out_schema, subset_only))
                    start += batch.num_rows
                    bar.update(batch.num_rows)
            if writer is None:
                writer = sink(_out_schema(source.schema, with_selected))
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


def _remove_stale_temporaries(out: Path) -> None:
    """Delete `.NAME.PID.tmp` files left next to `out` by exports that were killed (their process is gone)."""
    from valuekit.runlog import _pid_alive

    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        pid = tmp.name[len(out.name) + 2: -len(".tmp")]
        if pid.isdigit() and not _pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)


class _FileSink:
    """Writes batches to a hidden temporary file next to `out`; `finish` renames it over `out`.

    Parquet batches are gathered into row groups of up to `_ROW_GROUP_ROWS` rows / `_ROW_GROUP_BYTES`
    bytes (pyarrow's default is 1M rows): one small row group per batch would let dictionary encoding
    swallow whole float columns and make the file ~1.5x larger.
    """

    def __init__(self, out: Path, schema: pa.Schema):
        self.out = out
        _remove_stale_temporaries(out)
        self.tmp = temp_path(out)  # the same hidden .NAME.PID.tmp as runlog.write_atomic
        self.rows = 0
        self.csv = out.suffix.lower() == ".csv"
        self.schema = schema
        self.pending: list[pa.RecordBatch] = []
        self.pending_rows = self.pending_bytes = 0
        self.writer = pacsv.CSVWriter(self.tmp, schema) if self.csv else pq.ParquetWriter(self.tmp, schema)

    def write(self, batch: pa.RecordBatch) -> None:
        if not batch.num_rows:
            return
        self.rows += batch.num_rows
        if self.csv:
            self.writer.write_batch(batch)
            return
        self.pending.append(batch)
        self.pending_rows += batch.num_rows
        self.pending_bytes += batch.nbytes
        if self.pending_rows >= _ROW_GROUP_ROWS or self.pending_bytes >= _ROW_GROUP_BYTES:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            table = pa.Table.from_batches(self.pending, schema=self.schema)
            self.pending, self.pending_rows, self.pending_bytes = [], 0, 0
            self.writer.write_table(table, row_group_size=table.num_rows)

    def abort(self) -> None:
        self.pending = []
        try:
            self.writer.close()
        except Exception:
            pass
        self.tmp.unlink(missing_ok=True)

    def finish(self) -> int:
        try:
            if not self.csv:
                self._flush()
            self.writer.close()
            commit(self.tmp, self.out)
        finally:
            self.tmp.unlink(missing_ok=True)
        return self.rows


class _MemorySink:
    def __init__(self, schema: pa.Schema):
        self.schema, self.batches = schema, []

    def write(self, batch) -> None:
        self.batches.append(batch)

    def abort(self) -> None:
        self.batches = []

    def finish(self) -> pa.Table:
        return pa.Table.from_batches(self.batches, schema=self.schema)


def _csv_unwritable(schema: pa.Schema) -> str | None:
    for f in schema:
        t = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
        if pa.types.is_nested(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t) \
                or pa.types.is_fixed_size_binary(t):
            return f"column {f.name!r} is {f.type}, which CSV cannot hold; write a .parquet output instead"
    return None


# ---------------------------------------------------------------- public


def _check_out(out, source, run) -> Path:
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
    return out


def _prepare(table, run_dir, *, out, id_col, keep_fraction, top_k, drop_fraction, min_weight, subset_only, batch_rows):
    has_rule = check_selection(keep_fraction, top_k, drop_fraction, min_weight, subset_only)
    if not (isinstance(batch_rows, int) and batch_rows >= 1):
        raise InputError(f"--batch-rows {batch_rows}: must be an integer >= 1")
    run = read_run(run_dir)
    csv_out = out is not None and Path(out).suffix.lower() == ".csv"
    source = _open_source(table, for_csv_out=csv_out, frame_out=out is None)
    if out is not None:
        out = _check_out(out, source, run)
    names = source.schema.names
    if id_col not in names:
        raise InputError(f"{source.where}: missing column {id_col!r} "
                         f"(choose another with --id-col; columns: {names[:12]})")
    clash = [c for c in ADDED if c in names]
    if clash:
        raise InputError(f"{source.where}: already has column {clash[0]!r}, which score adds; rename it first")
    if csv_out:
        problem = _csv_unwritable(source.schema)
        if problem:
            raise InputError(f"{source.where}: {problem}")
    return run, source, out, has_rule


def write_scored(table, run_dir, out, *, id_col: str = "id", keep_fraction: float | None = None,
                 top_k: int | None = None, drop_fraction: float | None = None, min_weight: float | None = None,
                 subset_only: bool = False, batch_rows: int = DEFAULT_BATCH_ROWS,
                 progress: bool = False) -> ScoreSummary:
    """Stream `table` (path, DataFrame or Arrow table) into `out` (.parquet/.csv) with the run's values added.

    Memory holds the id column and five numbers per row, plus one batch of `batch_rows` rows.
    """
    run, source, out, _ = _prepare(table, run_dir, out=out, id_col=id_col, keep_fraction=keep_fraction,
                                   top_k=top_k, drop_fraction=drop_fraction, min_weight=min_weight,
                                   subset_only=subset_only, batch_rows=batch_rows)
    try:
        plan = _plan(source.ids(id_col), run, where=source.where, id_col=id_col, keep_fraction=keep_fraction,
                     top_k=top_k, drop_fraction=drop_fraction, min_weight=min_weight)
        pa.default_memory_pool().release_unused()  # hand pass 1's Arrow buffers back before streaming
        n = len(plan.weight)
        if isinstance(source, _CsvSource):
            source.set_batch_rows(batch_rows)
        out.parent.mkdir(parents=True, exist_ok=True)
        rows = _stream(source, plan, n=n, batch_rows=batch_rows, subset_only=subset_only,
                       sink=lambda schema: _FileSink(out, schema), progress=progress)
    finally:
        source.close()
    return ScoreSummary(out, n, rows, None if plan.selected is None else int(plan.selected.sum()))


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
) -> pd.DataFrame | Path:
    """Join a run's values onto `table` by id; return a DataFrame, or stream into `out` and return its path.

    `table` is a .parquet/.csv path, a pandas DataFrame or a pyarrow Table. Added columns: `weight`
    (mean 1 over all input rows, ready for `sample_weight=` or `WeightedRandomSampler`), `value`,
    `value_std`, `rank` (1 = most valuable, NaN values last) and, with one of `keep_fraction`
    (top fraction by value), `top_k`, `drop_fraction` (drop the lowest fraction) or `min_weight`,
    a boolean `selected`; `subset_only=True` keeps just the selected rows. A DataFrame input comes
    back as a DataFrame with its own dtypes and index.
    """
    if out is not None:
        return write_scored(table, run_dir, out, id_col=id_col, keep_fraction=keep_fraction, top_k=top_k,
                            drop_fraction=drop_fraction, min_weight=min_weight, subset_only=subset_only,
                            batch_rows=batch_rows, progress=progress).path
    run, source, _, _ = _prepare(table, run_dir, out=None, id_col=id_col, keep_fraction=keep_fraction,
                                 top_k=top_k, drop_fraction=drop_fraction, min_weight=min_weight,
                                 subset_only=subset_only, batch_rows=batch_rows)
    try:
        plan = _plan(source.ids(id_col), run, where=source.where, id_col=id_col, keep_fraction=keep_fraction,
                     top_k=top_k, drop_fraction=drop_fraction, min_weight=min_weight)
        if isinstance(source, _FrameSource):
            return _frame_result(table, plan, subset_only)
        if isinstance(source, _CsvSource):
            source.set_batch_rows(batch_rows)
        t = _stream(source, plan, n=len(plan.weight), batch_rows=batch_rows, subset_only=subset_only,
                    sink=_MemorySink, progress=progress)
    finally:
        source.close()
    return t.to_pandas()


def _frame_result(df: pd.DataFrame, plan: _Plan, subset_only: bool) -> pd.DataFrame:
    """Stay in pandas so every dtype (nullable, categorical, object) and the index come back as given."""
    added = {"weight": plan.weight, "value": plan.value, "value_std": plan.value_std, "rank": plan.rank}
    if plan.selected is not None:
        added["selected"] = plan.selected
    res = df.assign(**added)
    return res[plan.selected] if subset_only else res
