"""Opening the run directory for training: a fresh one, or a resume that checks the same data, settings and
world size and returns the checkpoint to continue from."""

from __future__ import annotations

import json
from pathlib import Path

from valuekit.errors import RunDirError
from valuekit.runs.layout import LOCK, RUN_FILES, RUN_JSON, SOURCE_TABLE, SUBSET_VALUE
from valuekit.runs.lock import acquire_lock, new_run_id
from valuekit.runs.paths import check_parts, data_difference, make_run_dir, remove_if_empty, remove_run_files
from valuekit.runs.reader import read_run
from valuekit.training.checkpoint import load_checkpoint


def identity(meta: dict) -> dict:
    """The parts of run.json that a resumed run must share with the original (compared as JSON, so that
    tuples in a fresh config equal the lists read back from run.json)."""
    # may change
    free = ("steps", "epochs", "patience", "eval_every", "progress", "device", "log_steps", "data_workers")
    loop = {"early_stopping": False, **{k: v for k, v in meta["config"].items() if k not in free}}  # older runs lack it
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
        return data_difference(old, new) if key == "data" else key
    fields = [f for f in sorted(set(old) | set(new)) if old.get(f) != new.get(f)]
    return f"{key} ({'; '.join(f'{f}: the run has {old.get(f)!r}, this call {new.get(f)!r}' for f in fields)})"


def check_world_size(out, made_with: int, now: int) -> None:
    """A run continues only with the processes it was made with (the global batch and steps/rank-R depend on it)."""
    if made_with != now:
        raise RunDirError(f"{out}: resume=True with {now} process(es), but the run was made with {made_with} "
                          f"(world size); resume with {made_with} process(es)")


def prepare_run(out: Path, meta: dict, resume: bool, overwrite: bool = False):
    """(lock, checkpoint state or None) for a fresh, resumed or (`overwrite`: its files replaced) run directory; rank 0
    only. A resumed run takes run_id and started_at from the original; a fresh one gets a run_id."""
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
                raise RunDirError(f"{out}: resume=True with different {', '.join(diff)} than the run was made with")
            state = load_checkpoint(out, training=True)
            if state is not None:
                check_parts(out, state["parts"], world_size=old.meta.get("world_size", 1))
            meta["run_id"], meta["started_at"] = old.meta.get("run_id"), old.meta.get("started_at")
        elif (out / RUN_JSON).exists() and overwrite:  # the lock is held: no process writes there now
            remove_run_files(out, [n for n in (*RUN_FILES, SUBSET_VALUE, SOURCE_TABLE) if n != LOCK])
        elif (out / RUN_JSON).exists():
            raise RunDirError(
                f"{out}: already holds a run; pass resume=True to continue it or overwrite=True to replace it"
            )
    except BaseException:
        lock.unlink(missing_ok=True)
        if created:
            remove_if_empty(out)
        raise
    meta.setdefault("run_id", new_run_id())
    return lock, state
