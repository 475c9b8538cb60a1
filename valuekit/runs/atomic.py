"""Atomic writes: a file appears whole or not at all (temporary file in the same folder, then a rename);
the only place that renames files into place."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from valuekit.errors import first_line


def temp_path(path: Path) -> Path:
    """The hidden temporary file next to `path` that an atomic write fills before renaming it over `path`
    (`.NAME.PID.tmp`: a killed writer's leftovers can be told apart by their process id)."""
    path = Path(path)
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def write_atomic(path: Path, write: Callable[[Path], None]) -> Path:
    """`write(tmp)` fills a hidden temporary file in `path`'s folder, which is then renamed over `path`:
    readers see the old file or the whole new one, never half of it; the temporary is removed on failure.
    (A writer that streams over time, like export's, fills `temp_path(path)` itself and calls `commit`.)"""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(tmp)
        commit(tmp, path)
    except OSError as exc:  # a full disk, a quota: said of the file meant, not of the hidden temporary
        raise OSError(exc.errno, exc.strerror or first_line(exc), str(path)) from exc
    finally:
        tmp.unlink(missing_ok=True)
    return path


def commit(tmp: Path, path: Path) -> None:
    """Rename a filled temporary over `path` (atomic on one filesystem)."""
    os.replace(tmp, path)


def write_parquet_atomic(table: pa.Table, path: Path, *, row_group_size: int | None = None) -> None:
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, row_group_size=row_group_size))


def write_json_atomic(obj: dict, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2, default=str)))


def write_text_atomic(text: str, path: Path) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
