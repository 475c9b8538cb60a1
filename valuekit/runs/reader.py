"""Reading a run directory back: `Run` (meta, steps, metrics, sources, values) and `read_run` / `open_run`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from valuekit.errors import InputError, RunDirError, unreadable
from valuekit.ranking import mean_one, rank_by_value
from valuekit.runs.layout import (
    BEST,
    CHECKPOINT,
    META_LOSS_METHODS,
    METRICS_SCHEMA,
    RUN_JSON,
    SCHEMA_VERSION,
    SOURCE_TABLE,
    TABLES,
    VALUES,
)
from valuekit.runs.lock import lock_held
from valuekit.runs.paths import REQUIRED, check_columns


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
    def column_docs(self) -> dict[str, str]:
        """What `value`, `value_std` and `weight` (and the method's learned quantity) mean for this run's method,
        one sentence each (run.json's `column_docs`; empty for runs written before it existed)."""
        return dict(self.meta.get("column_docs") or {})

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

    # early stopping's best.pt, else None: torch.load(path, weights_only=True)["model"] is the model's state dict
    best_model_path = property(lambda self: self.path / BEST if (self.path / BEST).exists() else None)
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

    def check(self) -> Run:
        """Open every file of the run far enough to know it is a valuekit file (schemas, not the data):
        a damaged one raises `InputError("RUN/file: unreadable (...)")` before any output is made, and so
        does a completed run whose values.parquet is gone."""
        if self.checked_values_path() is None and self.meta.get("status") == "completed":
            raise self._values_missing()
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
        if self.meta.get("status") == "completed":
            # a completed run wrote values.parquet: a stand-in from the step log would silently differ from it
            raise self._values_missing()
        return self.values_from_steps() if partial else None

    def _values_missing(self) -> InputError:
        return InputError(f"{self.values_path}: missing; the run completed but its values file is gone (restore it "
                          f"or train the run again)")

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
    if meta.get("status") == "running" and not lock_held(path):
        # The writer died without closing (SIGKILL, power loss): what is on disk is an interrupted run.
        meta["status"] = "interrupted"
    return Run(path, meta)


def open_run(run) -> Run:
    """A Run for a run directory path or an already opened Run (the one way analysis, report and export open runs)."""
    return run if isinstance(run, Run) else read_run(Path(run))


def example_labels(run) -> pd.DataFrame:
    """example_id -> label code of every example seen in steps/ (group_by over the log)."""
    run = open_run(run)
    d = run.dataset("steps")
    if d is None:
        return pd.DataFrame({"example_id": [], "label": []})
    g = d.to_table(columns=["example_id", "label"]).group_by("example_id").aggregate([("label", "min")])
    return pd.DataFrame({"example_id": g["example_id"].to_numpy(zero_copy_only=False),
                         "label": g["label_min"].to_numpy().astype(np.int64)})
