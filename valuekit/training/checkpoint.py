"""checkpoint.pt: saved atomically, loaded with `weights_only=True`, and checked before a resume trusts it."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from valuekit.errors import first_line, unreadable
from valuekit.runs.atomic import write_atomic
from valuekit.runs.layout import CHECKPOINT, TABLES
from valuekit.runs.paths import CHECKPOINT_KEYS


def save_checkpoint(run_dir, blob: dict, name: str = CHECKPOINT) -> None:
    """checkpoint.pt (or best.pt), written atomically (torch.save of tensors, numbers, lists and dicts only)."""
    import torch

    path = Path(run_dir) / name

    def save(tmp: Path) -> None:
        try:
            torch.save(blob, tmp)
        except RuntimeError as exc:  # torch's zip writer reports a full disk as "[enforce fail at inline_container.cc]"
            import shutil

            if shutil.disk_usage(tmp.parent).free < 2**20:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp)) from exc
            raise OSError(errno.EIO, f"torch.save failed ({first_line(exc)[:160]})", str(tmp)) from exc

    write_atomic(path, save)


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


def check_training_state(state, path: Path, tables) -> None:
    """A checkpoint the training loop can resume from: its entries and their types."""
    import torch

    if not isinstance(state, dict):
        raise unreadable(path, f"holds a {type(state).__name__}, not a valuekit checkpoint")
    for key, kind in CHECKPOINT_KEYS.items():
        if not isinstance(state.get(key), kind) or isinstance(state.get(key), bool):
            raise unreadable(path, f"no valid {key!r} entry; not a valuekit checkpoint")
    if not isinstance(state.get("generator"), torch.Tensor) or state["generator"].dtype != torch.uint8:
        raise unreadable(path, "no valid 'generator' entry; not a valuekit checkpoint")
    if state["step"] < 0 or not all(isinstance(v, int) and v >= 0 for v in state["parts"].values()) \
            or not set(state["parts"]) <= set(tables):
        raise unreadable(path, "invalid 'step' or 'parts' entry; not a valuekit checkpoint")
