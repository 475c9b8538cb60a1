"""A user's table read and written in Arrow record batches, for exports of tables larger than memory.

Sources stream every column of a Parquet file (`ParquetFile.iter_batches`), a CSV file (`open_csv`,
restarting with the unified type when a later block does not convert), an Arrow table or a pandas
DataFrame. Sinks gather batches in memory or write them with a `ParquetWriter`/`CSVWriter` into the
hidden temporary of `valuekit.runs.atomic.temp_path`, renamed over the output only when complete.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from valuekit.errors import InputError
from valuekit.runs.atomic import commit, temp_path

PARQUET_SUFFIXES = (".parquet", ".pq")
_ROW_GROUP_ROWS = 1 << 20  # output Parquet row groups: pyarrow's default length ...
_ROW_GROUP_BYTES = 128 << 20  # ... or this much Arrow data, whichever comes first
_CSV_MIN_BLOCK = 1 << 14  # bytes; open_csv needs every row to fit in one block
_CSV_MAX_BLOCK = 1 << 26


# ---------------------------------------------------------------- sources


class _Source:
    """What pass 1 and pass 2 need from a table: `schema`, `ids(id_col)`, `batches(batch_rows)`."""

    path: Path | None = None

    def close(self) -> None:
        pass


FRAME = "table to score (argument `table`)"  # how messages name a table given as a DataFrame or Arrow table


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
        self.df, self.where, self.path = df, FRAME, None
        self.schema = pa.schema([(str(c), pa.null()) for c in df.columns])  # names only

    def ids(self, id_col: str) -> pa.Array:
        try:
            return pa.array(self.df[id_col], from_pandas=True)
        except (pa.ArrowException, ValueError, TypeError) as exc:
            raise InputError(
                f"{FRAME}: column {id_col!r} mixes types or is not int/str ({_first_line(exc)})") from None


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
        # with one thread pyarrow names the row too ("CSV column #1: Row #5997: CSV conversion error to ...")
        m = re.search(r"CSV column #(\d+):(?: Row #\d+:)? CSV conversion error to ([^:]+):", msg)
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
            raise InputError(f"{FRAME}: cannot convert to Arrow ({_first_line(exc)})") from None
        return _TableSource(t, FRAME)
    if isinstance(table, pa.Table):
        return _TableSource(table, FRAME)
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


# ---------------------------------------------------------------- sinks


def _remove_stale_temporaries(out: Path) -> None:
    """Delete `.NAME.PID.tmp` files left next to `out` by exports that were killed (their process is gone)."""
    from valuekit.runs.lock import pid_alive

    for tmp in out.parent.glob(f".{out.name}.*.tmp"):
        pid = tmp.name[len(out.name) + 2: -len(".tmp")]
        if pid.isdigit() and not pid_alive(int(pid)):
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
        try:
            self.writer = pacsv.CSVWriter(self.tmp, schema) if self.csv else pq.ParquetWriter(self.tmp, schema)
        except BaseException:  # e.g. SIGTERM right after the file was created: the caller has no sink to abort
            self.tmp.unlink(missing_ok=True)
            raise

    def _named(self, exc: OSError) -> OSError:
        """A failed write (a full disk) said of the output file, not of the hidden temporary."""
        from valuekit.errors import first_line

        why = exc.strerror or first_line(exc)
        code = exc.errno
        if code is None and "errno 28" in why.lower():  # pyarrow's own wording of a full disk
            code, why = errno.ENOSPC, os.strerror(errno.ENOSPC)
        return OSError(code, why, str(self.out))

    def write(self, batch: pa.RecordBatch) -> None:
        try:
            self._write(batch)
        except OSError as exc:
            raise self._named(exc) from exc

    def _write(self, batch: pa.RecordBatch) -> None:
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
        except OSError as exc:
            raise self._named(exc) from exc
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
