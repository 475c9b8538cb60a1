"""Shared parts of the text study suites (`valuekit bench multidds-* / llm`): a registry of suite runners,
resumable per-run records and mean ± std cells.

A text suite is a function `run(out, *, command, device, quick, seeds, steps, datasets, methods, runs_dir,
report_only)`
that trains through `valuekit.train`, appends one JSON record per finished run and writes OUT/suite-NAME.md
(with its command line) and .csv. With `runs_dir` the run directories and the records are kept there, and a
second call with the same folder skips the runs already recorded (a long grid can be stopped and resumed, or split
over processes); `report_only` writes the tables from the recorded runs of the grid and trains nothing.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

RECORDS = "records.jsonl"


@dataclass(frozen=True)
class TextSuite:
    name: str
    title: str
    run: Callable  # the runner, see the module docstring
    data: tuple[str, ...]  # what --datasets may name (targets for multidds, the data set for llm)
    arms: tuple[str, ...]  # what --methods may name (variants / arms)




NAMES = ("multidds-targets", "multidds-signal", "multidds-model", "llm", "llm-memory")


@contextmanager
def work_folder(runs_dir, name: str):
    """runs_dir/NAME (kept) or a temporary folder (removed afterwards)."""
    if runs_dir:
        folder = Path(runs_dir) / name
        folder.mkdir(parents=True, exist_ok=True)
        yield folder
    else:
        with tempfile.TemporaryDirectory(prefix=f"valuekit-{name}-") as tmp:
            yield Path(tmp)


class Records:
    """Append-only JSON lines of finished runs, keyed by a tuple of fields (resume skips recorded keys)."""

    def __init__(self, folder: Path, key: tuple[str, ...], *, report_only: bool = False):
        self.path, self.key, self.report_only = Path(folder) / RECORDS, key, report_only
        self.rows = self._read()

    def _read(self) -> list[dict]:
        return [json.loads(line) for line in self.path.read_text().splitlines()] if self.path.exists() else []

    def has(self, **key) -> bool:
        """Re-reads the file: another process sharing the folder may have recorded the run meanwhile.
        With report_only every run counts as recorded: nothing trains, the tables show what the file holds."""
        self.rows = self._read()
        return self.report_only or any(all(r.get(k) == key[k] for k in self.key) for r in self.rows)

    def get(self, **key) -> dict | None:
        return next((r for r in self.rows if all(r.get(k) == key[k] for k in self.key)), None)

    def add(self, row: dict) -> None:
        with open(self.path, "a") as f:  # one line per run: a crash loses at most the run in progress
            f.write(json.dumps(row) + "\n")
        self.rows = self._read()


def fresh(run_dir: Path) -> Path:
    """`run_dir` emptied: a folder left by a run that was stopped before it was recorded is trained again.
    A folder whose lock a live process holds (another process sharing --runs-dir is training it) is refused."""
    from valuekit.errors import RunDirError
    from valuekit.runs.lock import lock_held

    if Path(run_dir).exists():
        if lock_held(Path(run_dir)):
            raise RunDirError(f"{run_dir}: run directory is in use by another valuekit process; give processes that "
                              "share --runs-dir different --seeds/--datasets/--methods")
        shutil.rmtree(run_dir)
    return Path(run_dir)


def completed(run):
    """The run, or RuntimeError when it stopped early (an interrupted run must not be recorded as finished)."""
    if run.meta.get("status") != "completed":
        raise RuntimeError(f"{run.path}: run ended {run.meta.get('status')!r}; not recorded")
    return run


def mean_sd(values, digits: int = 3) -> str:
    """"m ± sd" over the finite values, "m (n=1)" for one, "–" for none."""
    v = np.asarray([x for x in values if x is not None and np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return "–"
    if len(v) == 1:
        return f"{v[0]:.{digits}f} (n=1)"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def md_table(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header),
            *["| " + " | ".join(str(c) for c in row) + " |" for row in rows]]
