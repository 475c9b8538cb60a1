"""The run directory: the contract between training and everything after it.

    run.json                  config, seed, versions, input hashes, status
    steps/part-NNNNN.parquet  one row per example per step it was seen
    metrics/part-NNNNN.parquet one row per step
    sources/part-NNNNN.parquet multi-source methods: step, source, prob, count, reward, reward_se
    values.parquet            final per-example value
    sources.parquet           multi-source methods: one row per source (final prob, mean reward, rows)
    checkpoint.pt             enough to resume (loaded with weights_only=True)

Parts are written to a hidden temporary file and renamed, so every visible part is a
closed, readable Parquet file even after SIGKILL. Schemas are declared here once and
stored in each file's metadata.

This module is the one owner of the run directory: the file names above are spelled only
here (RUN_JSON, VALUES, CHECKPOINT, ...), and preparing/locking a directory, checkpoint
save/load, atomic writes (`write_atomic`, also used for reports, audits and exports) and
opening a run (`open_run`) live here; the part writers live in `valuekit.partwriter` (re-exported
here). It imports torch only inside the checkpoint functions.
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from valuekit.errors import RunDirError
from valuekit.partwriter import AsyncPartWriter, PartWriter  # noqa: F401 - re-exported; RunWriter's logs
from valuekit.paths import (REQUIRED, check_columns, check_training_state, make_run_dir, remove_if_empty,
                            take_over_stale, unreadable)

SCHEMA_VERSION = 1
RUN_JSON = "run.json"
VALUES = "values.parquet"
CHECKPOINT = "checkpoint.pt"
SUBSET_VALUE = "subset_value.parquet"  # written by valuekit.retrain.subset_value
SOURCE_TABLE = "sources.parquet"  # per-source companion of values.parquet (multi-source methods)
LOCK = ".lock"
STEPS, METRICS, SOURCES = "steps", "metrics", "sources"
TABLES = (STEPS, METRICS, SOURCES)
# Everything in a run directory that belongs to the run: never an output (valuekit.paths.check_output).
RUN_FILES = (RUN_JSON, VALUES, CHECKPOINT, LOCK, *TABLES)


def _id_type(id_type: str) -> pa.DataType:
    return pa.int64() if id_type == "int64" else pa.string()


def steps_schema(id_type: str) -> pa.Schema:
    return pa.schema([
        ("step", pa.int64()),
        ("example_id", _id_type(id_type)),
        ("label", pa.int32()),
        ("source", pa.string()),
        ("weight", pa.float32()),
        ("reward", pa.float32()),
        ("loss", pa.float32()),
        ("selected", pa.bool_()),
    ])


METRICS_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("train_loss", pa.float64()),
    ("train_acc", pa.float64()),
    ("dev_loss", pa.float64()),
    ("dev_acc", pa.float64()),
    ("test_loss", pa.float64()),
    ("test_acc", pa.float64()),
    ("scorer_loss", pa.float64()),  # dds/multidds: the scorer's REINFORCE loss
    ("meta_loss", pa.float64()),  # lrdi/l2rw/mwnet/hostcp: the dev loss of the meta (look-ahead) step
    ("step_time", pa.float64()),
    ("wall_time", pa.float64()),
    ("cuda_mem_mb", pa.float64()),  # peak CUDA memory allocated during the step (MiB); null off CUDA
])

META_LOSS_METHODS = ("lrdi", "l2rw", "mwnet", "hostcp")  # methods whose meta_loss column is filled

SOURCES_SCHEMA = pa.schema([
    ("step", pa.int64()),
    ("source", pa.string()),
    ("prob", pa.float64()),
    ("count", pa.int64()),
    # the scorer update's per-source reward and its standard error (null where the step had no update);
    # runs written before these columns existed read back without them
    ("reward", pa.float64()),
    ("reward_se", pa.float64()),
])

SOURCE_TABLE_SCHEMA = pa.schema([
    ("source", pa.string()),
    ("prob", pa.float64()),  # final scorer probability (as in sources/)
    ("logit", pa.float64()),  # final scorer logit, centred over sources
    ("uniform_prob", pa.float64()),  # the probability a uniform scorer gives the source
    ("mean_reward", pa.float64()),  # mean over scorer updates of the source's reward
    ("reward_se", pa.float64()),  # standard error of that mean from the per-update standard errors
    ("updates", pa.int64()),  # scorer updates that observed the source
    ("rows", pa.int64()),  # training rows of the source
    ("drawn", pa.int64()),  # rows drawn from the source over the run
    ("is_target", pa.bool_()),  # the dev set's (target) source
])


def values_schema(id_type: str, extra: list[str] = ()) -> pa.Schema:
    fields = [
        ("example_id", _id_type(id_type)),
        ("value", pa.float64()),
        ("value_std", pa.float64()),
        ("weight", pa.float64()),
        ("rank", pa.int64()),
    ]
    return pa.schema(fields + [(c, pa.float64()) for c in extra])


def _meta(table: str, run_id: str) -> dict[bytes, bytes]:
    return {
        b"valuekit.schema_version": str(SCHEMA_VERSION).encode(),
        b"valuekit.table": table.encode(),
        b"valuekit.run_id": run_id.encode(),
    }


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


def new_run_id() -> str:
    return f"{int(time.time() * 1000):x}-{os.getpid()}"


# ---------------------------------------------------------------- locking


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def acquire_lock(run_dir: Path) -> Path:
    """Create run_dir/.lock holding host:pid; a lock of a dead process on this host is taken over."""
    lock = Path(run_dir) / LOCK
    me = f"{socket.gethostname()}:{os.getpid()}"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                holder = lock.read_text().strip()
            except (OSError, UnicodeDecodeError):
                holder = ""
            host, _, pid = holder.rpartition(":")
            if host == socket.gethostname() and pid.isdigit() and not _pid_alive(int(pid)):
                take_over_stale(lock, holder)
                continue
            raise RunDirError(
                f"{run_dir}: run directory is in use by another valuekit process ({holder or 'unknown'}); "
                f"wait for it or remove {lock} if that process is gone"
            ) from None
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return lock
    raise RunDirError(f"{run_dir}: could not take the lock {lock}")


def rank_by_value(value) -> np.ndarray:
    """Rank of each row, 1 = highest value; ties keep row order and NaN (never valued) ranks last."""
    order = np.argsort(-np.asarray(value, dtype=np.float64), kind="stable")
    rank = np.empty(len(order), dtype=np.int64)
    rank[order] = np.arange(1, len(order) + 1)
    return rank


def mean_one(weight) -> np.ndarray:
    """Weights scaled to mean 1 over the rows (all ones when they sum to zero)."""
    w = np.asarray(weight, dtype=np.float64)
    total = w.sum()
    return w * (len(w) / total) if total > 0 else np.ones(len(w))


# ---------------------------------------------------------------- writing


class RunWriter:
    """Creates or reopens a run directory, holds its lock, writes parts, values and run.json."""

    def __init__(self, run_dir, *, meta: dict, id_type: str, lock: Path | None = None,
                 resume_parts: dict[str, int] | None = None, rank: int = 0, world_size: int = 1,
                 rows: dict | None = None):
        """Under torchrun (world_size > 1) every rank makes one: each writes steps/rank-R/part-*.parquet, and
        only rank 0 holds the lock and writes run.json, metrics/, sources/ and values.parquet. `rows`
        {"example_id": ids, "label": int32 labels or None, "source": str sources or None}, one entry per
        training row: then a step's log gives `rows=` (row numbers) and the writer thread fills these in."""
        self.dir = Path(run_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.main = rank == 0
        self.lock = (lock or acquire_lock(self.dir)) if self.main else None
        self.meta = dict(meta)
        self.meta.setdefault("schema_version", SCHEMA_VERSION)
        self.meta.setdefault("run_id", new_run_id())
        self.id_type = id_type
        run_id = self.meta["run_id"]
        parts = resume_parts or {}
        folders = {name: self.dir / name for name in TABLES}
        if world_size > 1:
            folders["steps"] = self.dir / "steps" / f"rank-{rank}"
        if resume_parts is not None:
            # Parts written after the checkpoint we resume from are regenerated by the resumed run.
            for name in TABLES if self.main else ("steps",):
                for p in sorted(folders[name].glob("part-*.parquet")):
                    if int(p.stem.split("-")[1]) >= parts.get(name, 0):
                        p.unlink()
        # the three logs are written by background threads (AsyncPartWriter): the loop only hands over arrays
        schema = steps_schema(id_type)
        lookups = {k: pa.array(v.tolist() if v.dtype == object else v, schema.field(k).type)
                   for k, v in (rows or {}).items() if v is not None}
        self.steps = AsyncPartWriter(folders["steps"], schema, "steps", run_id, parts.get("steps", 0),
                                     lookups=lookups)
        self.metrics = AsyncPartWriter(self.dir / "metrics", METRICS_SCHEMA, "metrics", run_id,
                                       parts.get("metrics", 0))
        self.sources = AsyncPartWriter(self.dir / "sources", SOURCES_SCHEMA, "sources", run_id,
                                       parts.get("sources", 0))
        self.write_meta()

    def part_counts(self) -> dict[str, int]:
        """Parts flushed so far per table, once they are all on disk (what a checkpoint may record)."""
        self.sync()
        return {"steps": self.steps.next_part, "metrics": self.metrics.next_part, "sources": self.sources.next_part}

    def flush(self) -> None:
        """Close the buffered rows into parts; they are written in the background (`sync` waits)."""
        for w in (self.steps, self.metrics, self.sources):
            w.flush()

    def sync(self) -> None:
        for w in (self.steps, self.metrics, self.sources):
            w.sync()

    def write_meta(self, **updates) -> None:
        self.meta.update(updates)
        if self.main:
            write_json_atomic(self.meta, self.dir / RUN_JSON)

    def write_values(self, frame: pd.DataFrame) -> None:
        extra = [c for c in frame.columns if c not in ("example_id", "value", "value_std", "weight", "rank")]
        schema = values_schema(self.id_type, extra).with_metadata(_meta("values", self.meta["run_id"]))
        table = pa.Table.from_pandas(frame, schema=schema, preserve_index=False)
        write_parquet_atomic(table, self.dir / VALUES)

    def write_source_table(self, frame: pd.DataFrame) -> None:
        schema = SOURCE_TABLE_SCHEMA.with_metadata(_meta("source_table", self.meta["run_id"]))
        table = pa.Table.from_pandas(frame[SOURCE_TABLE_SCHEMA.names], schema=schema, preserve_index=False)
        write_parquet_atomic(table, self.dir / SOURCE_TABLE)

    def close(self, status: str, **updates) -> None:
        for w in (self.steps, self.metrics, self.sources):
            w.close()
        self.write_meta(status=status, **updates)
        if self.lock is not None:
            self.lock.unlink(missing_ok=True)


# ---------------------------------------------------------------- reading


@dataclass
class Run:
    """A run directory opened for reading; tables come back as Arrow tables or DataFrames."""

    path: Path
    meta: dict

    @property
    def name(self) -> str:
        return self.meta.get("name") or self.path.name

    @property
    def method(self) -> str:
        return self.meta.get("method", "?")

    @property
    def acc_metric(self) -> str:
        """What the metrics' train/dev/test_acc columns hold ("accuracy", or "chrF/100" for translation)."""
        return self.meta.get("acc_metric") or ("chrF/100" if (self.meta.get("config") or {}).get("model") == "seq2seq"
                                               else "accuracy")

    @property
    def meta_path(self) -> Path:
        return self.path / RUN_JSON

    @property
    def values_path(self) -> Path:
        return self.path / VALUES

    @property
    def checkpoint_path(self) -> Path:
        return self.path / CHECKPOINT

    @property
    def finished(self) -> bool:
        """values.parquet is there (the run completed)."""
        return self.values_path.exists()

    def dataset(self, table: str) -> ds.Dataset | None:
        """The table's parts as one dataset; a part that is not Parquet or lacks a column of the table's
        schema raises `InputError("RUN/table/part: unreadable (...)")`."""
        folder = self.path / table
        if not folder.is_dir():
            return None
        parts = sorted(folder.rglob("part-*.parquet"))
        if not parts:
            return None
        need = REQUIRED[table]
        schema = None
        for part in parts:
            try:
                part_schema = pq.read_schema(part)
            except Exception as exc:
                raise unreadable(part, exc) from None
            check_columns(part, part_schema, need)
            schema = schema or part_schema
        try:
            return ds.dataset([str(p) for p in parts], format="parquet", schema=schema)
        except Exception as exc:
            raise unreadable(folder, exc) from None

    def table(self, table: str, columns: list[str] | None = None) -> pa.Table | None:
        d = self.dataset(table)
        if d is None:
            return None
        try:
            return d.to_table(columns=columns)
        except Exception as exc:  # a part whose data pages are damaged or do not match the others
            raise unreadable(self.path / table, exc) from None

    def steps(self, columns: list[str] | None = None) -> pa.Table | None:
        return self.table("steps", columns)

    def metrics(self) -> pd.DataFrame:
        t = self.table("metrics")
        if t is None:
            return pd.DataFrame(columns=METRICS_SCHEMA.names)
        frame = t.to_pandas().sort_values("step", ignore_index=True)
        if "meta_loss" not in frame.columns:
            # runs written before meta_loss existed logged the meta-step dev loss as scorer_loss
            meta = self.meta.get("method") in META_LOSS_METHODS
            frame["meta_loss"] = frame["scorer_loss"] if meta else np.nan
            if meta:
                frame["scorer_loss"] = np.nan
            frame = frame[[c for c in METRICS_SCHEMA.names if c in frame.columns]]
        return frame

    def sources(self) -> pd.DataFrame | None:
        t = self.table("sources")
        return None if t is None else t.to_pandas().sort_values(["step", "source"], ignore_index=True)

    def source_table(self) -> pd.DataFrame | None:
        """sources.parquet (one row per source: final prob, logit, mean reward and its standard error,
        rows), or None for runs of single-source methods and runs that did not finish."""
        p = self.path / SOURCE_TABLE
        return pq.read_table(p).to_pandas() if p.exists() else None

    def checked_values_path(self) -> Path | None:
        """values.parquet after checking its schema (no data read), or None when the run has none."""
        p = self.values_path
        if not p.exists():
            return None
        try:
            if not p.is_file():
                raise IsADirectoryError("a folder, not a file")
            schema = pq.read_schema(p)
        except Exception as exc:
            raise unreadable(p, exc) from None
        check_columns(p, schema, REQUIRED["values"])
        return p

    def check(self) -> "Run":
        """Open every file of the run far enough to know it is a valuekit file (schemas, not the data):
        a damaged one raises `InputError("RUN/file: unreadable (...)")` before any output is made."""
        self.checked_values_path()
        for table in TABLES:
            self.dataset(table)
        return self

    def values(self, *, partial: bool = True) -> pd.DataFrame | None:
        """values.parquet; for a run that never finished (and `partial`), a stand-in from the step log
        (`attrs["partial"] = True`): value = mean logged weight, or minus the mean loss when no weights
        were logged. None when there is neither."""
        p = self.values_path
        if p.exists():
            try:
                if not p.is_file():
                    raise IsADirectoryError("not a file")
                table = pq.read_table(p)
            except Exception as exc:
                raise unreadable(p, exc) from None
            check_columns(p, table.schema, REQUIRED["values"])
            return table.to_pandas()
        return self.values_from_steps() if partial else None

    def values_from_steps(self) -> pd.DataFrame | None:
        """Per-example aggregates of steps/ (pyarrow group-by; the log is never loaded whole into pandas)."""
        t = self.steps(["example_id", "weight", "loss"])
        if t is None or t.num_rows == 0:
            return None
        g = t.group_by("example_id").aggregate([
            ("weight", "mean"), ("weight", "stddev"), ("weight", "count"), ("loss", "mean"), ("loss", "stddev"),
        ]).to_pandas()
        weighted = g["weight_count"].to_numpy() > 0
        value = np.where(weighted, g["weight_mean"], -g["loss_mean"])
        std = np.where(weighted, g["weight_stddev"], g["loss_stddev"])
        weight = mean_one(np.where(weighted, g["weight_mean"], 1.0))
        frame = pd.DataFrame({"example_id": g["example_id"], "value": value.astype(np.float64),
                              "value_std": std.astype(np.float64), "weight": weight, "rank": rank_by_value(value)})
        frame.attrs["partial"] = True
        return frame


def read_run(run_dir) -> Run:
    """Open a run directory, refusing missing ones and those written by another schema version."""
    path = Path(run_dir)
    meta_path = path / RUN_JSON
    if not meta_path.exists():
        raise RunDirError(f"{path}: not a valuekit run directory (no {RUN_JSON})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:  # a folder, binary garbage, broken JSON
        raise unreadable(meta_path, exc) from None
    if not isinstance(meta, dict):
        raise unreadable(meta_path, f"expected a JSON object, found {type(meta).__name__}")
    for key, kind in (("config", dict), ("method", str)):
        if key in meta and not isinstance(meta[key], kind):
            raise unreadable(meta_path, f"{key!r} is {json.dumps(meta[key])[:40]}, expected a {kind.__name__}")
    if not isinstance(meta.get("data", {}), (dict, type(None))):
        raise unreadable(meta_path, "'data' is not an object")
    version = meta.get("schema_version")
    if version != SCHEMA_VERSION:
        raise RunDirError(
            f"{path}: run directory has schema version {version!r}; this valuekit reads version {SCHEMA_VERSION}"
        )
    if meta.get("status") == "running" and not _lock_held(path):
        # The writer died without closing (SIGKILL, power loss): what is on disk is an interrupted run.
        meta["status"] = "interrupted"
    return Run(path, meta)


def _lock_held(run_dir: Path) -> bool:
    lock = run_dir / LOCK
    if not lock.exists():
        return False
    try:
        host, _, pid = lock.read_text().strip().rpartition(":")
    except (OSError, UnicodeDecodeError):
        return True  # something is there that we cannot read: treat the run as busy
    if host == socket.gethostname() and pid.isdigit():
        return _pid_alive(int(pid))
    return True


def open_run(run) -> Run:
    """A Run for a run directory path or an already opened Run (the one way analysis, report and export open runs)."""
    return run if isinstance(run, Run) else read_run(Path(run))


# ---------------------------------------------------------------- preparing, checkpoints


def identity(meta: dict) -> dict:
    """The parts of run.json that a resumed run must share with the original (compared as JSON, so that
    tuples in a fresh config equal the lists read back from run.json)."""
    loop = {k: v for k, v in meta["config"].items() if k not in ("steps", "progress", "device", "log_steps", "data_workers")}
    ident = {
        "method": meta["method"], "config": loop, "method_config": meta["method_config"],
        "data": {k: (v or {}).get("fingerprint") for k, v in meta["data"].items()},
        "world_size": meta.get("world_size", 1),  # the global batch and the rank folders of steps/ depend on it
    }
    return json.loads(json.dumps(ident, default=str))


def _difference(key: str, old, new) -> str:
    """`key`, and for settings the fields that differ with both values (a default may have changed since the run
    was made: the user then sees what to pass to match it)."""
    if key not in ("config", "method_config") or not (isinstance(old, dict) and isinstance(new, dict)):
        return key
    fields = [f for f in sorted(set(old) | set(new)) if old.get(f) != new.get(f)]
    return f"{key} ({'; '.join(f'{f}: the run has {old.get(f)!r}, this call {new.get(f)!r}' for f in fields)})"


def check_world_size(out, made_with: int, now: int) -> None:
    """A run continues only with the processes it was made with (the global batch and steps/rank-R depend on it)."""
    if made_with != now:
        raise RunDirError(f"{out}: --resume with {now} process(es), but the run was made with {made_with} "
                          f"(world size); resume with {made_with} process(es)")


def prepare_run(out: Path, meta: dict, resume: bool):
    """(lock, checkpoint state or None) for a fresh or resumed run directory; one process (rank 0) only.
    A resumed run takes run_id and started_at from the original; a fresh one gets a run_id."""
    out = Path(out)
    created = make_run_dir(out)  # True only if this process made it: never remove another's folder
    # The lock comes first: a second process on this directory stops before reading or writing anything.
    # A refused lock belongs to a process that uses this folder, so nothing is removed then.
    lock = acquire_lock(out)
    state = None
    try:
        if resume:
            old = read_run(out)
            if identity(old.meta) != identity(meta):
                check_world_size(out, old.meta.get("world_size", 1), meta.get("world_size", 1))
                new_id, old_id = identity(meta), identity(old.meta)
                diff = [_difference(k, old_id[k], new_id[k]) for k in new_id if new_id[k] != old_id[k]]
                raise RunDirError(f"{out}: --resume with different {', '.join(diff)} than the run was made with")
            state = load_checkpoint(out, training=True)
            meta["run_id"], meta["started_at"] = old.meta.get("run_id"), old.meta.get("started_at")
        elif (out / RUN_JSON).exists():
            raise RunDirError(f"{out}: already holds a run; use --resume to continue it or choose another --out")
    except BaseException:
        lock.unlink(missing_ok=True)
        if created:
            remove_if_empty(out)
        raise
    meta.setdefault("run_id", new_run_id())
    return lock, state


def save_checkpoint(run_dir, blob: dict) -> None:
    """checkpoint.pt, written atomically (torch.save of tensors, numbers, lists and dicts only)."""
    import torch

    write_atomic(Path(run_dir) / CHECKPOINT, lambda tmp: torch.save(blob, tmp))


def load_checkpoint(run_dir, *, training: bool = False) -> dict | None:
    """The run's checkpoint (weights_only=True: tensors and plain containers, never arbitrary objects),
    on the CPU; None when the run has none. A damaged or foreign file raises
    `InputError("RUN/checkpoint.pt: unreadable (...)")` (never the advice to unpickle it); with
    `training`, so does one without the loop's entries (step, trainer, sampler, generator, parts, elapsed)."""
    import torch

    path = Path(run_dir) / CHECKPOINT
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise unreadable(path, f"not a checkpoint valuekit can load safely: {type(exc).__name__}") from None
    if training:
        check_training_state(state, path, TABLES)
    return state
