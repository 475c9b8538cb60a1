"""Numbered Parquet parts of a run's step/metric/source logs (`steps/part-NNNNN.parquet`, ...).

`PartWriter` converts and writes in the caller's thread; `AsyncPartWriter` (what `runlog.RunWriter` uses)
keeps the step's arrays and writes each part from a background thread. Both write every part atomically
(hidden temporary file + rename, `runlog.write_parquet_atomic`) with the table's metadata. Re-exported from
`valuekit.runs.layout`.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pyarrow as pa


def _with_meta(schema: pa.Schema, table: str, run_id: str) -> pa.Schema:
    from valuekit.runs.layout import _meta

    return schema.with_metadata(_meta(table, run_id))


def _write_part(table: pa.Table, path: Path) -> None:
    from valuekit.runs.atomic import write_parquet_atomic

    write_parquet_atomic(table, path)


def _scalar(v) -> bool:
    """None or one value (a metrics cell), without np.ndim's cost on the writer thread."""
    return (
        v is None or isinstance(v, (int, float, bool, str, np.generic)) or (isinstance(v, np.ndarray) and v.ndim == 0)
    )


class PartWriter:
    """Buffers rows of one table and writes them as closed numbered parts."""

    def __init__(self, folder: Path, schema: pa.Schema, table: str, run_id: str, start_part: int = 0):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = _with_meta(schema, table, run_id)
        self.buffer: list[pa.RecordBatch] = []
        self.next_part = start_part

    def add(self, **columns) -> None:
        """Append rows; each column is an array, a scalar (repeated) or None (nulls)."""
        n = max((np.size(v) for v in columns.values() if v is not None and np.ndim(v) > 0), default=1)
        arrays = []
        for f in self.schema:
            v = columns.get(f.name)
            if v is None:
                arrays.append(pa.nulls(n, f.type))
            else:
                v = np.broadcast_to(np.asarray(v), (n,))
                arrays.append(pa.array(v.tolist() if v.dtype == object else v, f.type))
        self.buffer.append(pa.RecordBatch.from_arrays(arrays, schema=self.schema))

    def flush(self) -> None:
        if not self.buffer:
            return
        table = pa.Table.from_batches(self.buffer, schema=self.schema)
        _write_part(table, self.folder / f"part-{self.next_part:05d}.parquet")
        self.next_part += 1
        self.buffer = []


class AsyncPartWriter:
    """PartWriter's interface (`add`, `flush`, `next_part`) with the work moved off the training loop.

    `add` only keeps the step's column arrays (no Arrow conversion per step); `flush` hands the buffered
    steps to one background thread, which concatenates each column over all of them, builds one Arrow
    table and writes the part (hidden temporary file + rename, as PartWriter).  Part numbers are assigned
    at `flush` time, so they are the same as PartWriter's; `sync()` waits until every flushed part is on
    disk (RunWriter.part_counts and close call it, so a checkpoint never names a part that is not written).
    An error in the thread is raised again in the caller at the next add/flush/sync.
    """

    def __init__(self, folder: Path, schema: pa.Schema, table: str, run_id: str, start_part: int = 0,
                 *, max_pending: int = 2, lookups: dict[str, pa.Array] | None = None):
        """`lookups` {column: Arrow array over the table's rows}: a step may give `rows` (int64 row numbers)
        instead of those columns, and the writer thread fills them in with one `take` per part, so the loop
        does no per-step indexing or string handling."""
        import queue
        import threading

        self.lookups = dict(lookups or {})
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.schema = _with_meta(schema, table, run_id)
        self.buffer: list[dict] = []
        self.next_part = start_part
        self.error: BaseException | None = None
        self.jobs: queue.Queue = queue.Queue(maxsize=max_pending)  # bounded: memory stays flat if disk is slow
        self.busy_s = 0.0  # CPU seconds the writer thread spent building and writing parts (time.thread_time)
        self.thread = threading.Thread(target=self._work, name=f"valuekit-{table}-writer", daemon=True)
        self.thread.start()

    def _raise(self) -> None:
        if self.error is not None:
            error, self.error = self.error, None
            if isinstance(error, OSError):  # a full disk: it names the part (runlog.write_atomic)
                raise error
            raise RuntimeError(f"writing {self.folder} failed: {error}") from error

    def add(self, **columns) -> None:
        """Append rows; each column is an array, a scalar (repeated) or None (nulls). The arrays are kept
        as they are (the caller must not modify them afterwards)."""
        self._raise()
        self.buffer.append(columns)

    def flush(self) -> None:
        self._raise()
        if not self.buffer:
            return
        if not self.thread.is_alive():  # closed: write here
            self.close()
            return
        self.jobs.put((self.buffer, self.folder / f"part-{self.next_part:05d}.parquet"))
        self.next_part += 1
        self.buffer = []

    def sync(self) -> None:
        """Wait until every flushed part is written."""
        self.jobs.join()
        self._raise()

    def close(self) -> None:
        """Write what is buffered and stop the thread (a later flush writes in the caller's thread)."""
        if not self.thread.is_alive():
            if self.buffer:
                _write_part(self._table(self.buffer), self.folder / f"part-{self.next_part:05d}.parquet")
                self.next_part += 1
                self.buffer = []
            self._raise()
            return
        try:
            self.flush()
            self.sync()
        finally:  # the thread stops even when a part could not be written (the error is raised)
            self.jobs.put(None)
            self.thread.join()

    def _work(self) -> None:
        while True:
            job = self.jobs.get()
            try:
                if job is None:
                    return
                if self.error is None:  # after a failure, later parts are dropped (the error is reported)
                    rows, path = job
                    t0 = time.thread_time()
                    _write_part(self._table(rows), path)
                    self.busy_s += time.thread_time() - t0
            except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                self.error = exc
            finally:
                self.jobs.task_done()

    def _table(self, rows: list[dict]) -> pa.Table:
        sizes = [max((np.size(v) for v in r.values() if not _scalar(v)), default=1) for r in rows]
        total = int(sum(sizes))
        taken = {}
        if self.lookups and all("rows" in r for r in rows):
            index = pa.array(np.concatenate([np.asarray(r["rows"], dtype=np.int64) for r in rows]))
            taken = {name: arr.take(index) for name, arr in self.lookups.items()}
        arrays = []
        for f in self.schema:
            if f.name in taken:
                arrays.append(taken[f.name])
                continue
            parts = [r.get(f.name) for r in rows]
            if total == len(rows) and all(_scalar(v) for v in parts):  # one scalar (or None) per step: metrics
                arrays.append(pa.array([v.item() if isinstance(v, np.generic) else v for v in parts], f.type))
                continue
            if all(v is None for v in parts):
                arrays.append(pa.nulls(total, f.type))
                continue
            if all(_scalar(v) and v is not None for v in parts):  # one value per step (the step number)
                arrays.append(pa.array(np.repeat(np.asarray(parts), sizes), f.type))
                continue
            if any(v is None for v in parts):  # some steps have the column, some not: mask the missing rows
                mask = np.concatenate([np.full(n, v is None) for v, n in zip(parts, sizes)])
                filler = next(v for v in parts if v is not None)
                dtype = np.asarray(filler).dtype
                parts = [np.zeros(n, dtype=dtype) if v is None else v for v, n in zip(parts, sizes)]
            else:
                mask = None
            col = np.concatenate([v if isinstance(v, np.ndarray) and v.ndim == 1 and len(v) == n
                                  else np.broadcast_to(np.asarray(v), (n,)) for v, n in zip(parts, sizes)])
            if col.dtype == object:
                values = col.tolist()
                if mask is not None:
                    values = [None if m else v for v, m in zip(values, mask)]
                arrays.append(pa.array(values, f.type))
            else:
                arrays.append(pa.array(col, f.type, mask=mask))
        return pa.Table.from_arrays(arrays, schema=self.schema)
