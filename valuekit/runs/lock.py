"""The run directory's lock: one writer at a time, stale locks of dead processes taken over, and run ids."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from valuekit.errors import RunDirError
from valuekit.runs.layout import LOCK


def new_run_id() -> str:
    return f"{int(time.time() * 1000):x}-{os.getpid()}"


def pid_alive(pid: int) -> bool:
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
            if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
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


def lock_held(run_dir: Path) -> bool:
    lock = run_dir / LOCK
    if not lock.exists():
        return False
    try:
        host, _, pid = lock.read_text().strip().rpartition(":")
    except (OSError, UnicodeDecodeError):
        return True  # something is there that we cannot read: treat the run as busy
    if host == socket.gethostname() and pid.isdigit():
        return pid_alive(int(pid))
    return True


def take_over_stale(lock: Path, holder: str) -> None:
    """Remove the lock of a dead process, and only that one: the lock is renamed away first (atomic), and
    when what was moved is a fresh lock another process made meanwhile, it is put back (link fails when a
    third process already holds the name, in which case that one keeps it)."""
    moved = lock.with_name(f"{lock.name}.stale.{os.getpid()}")
    try:
        os.rename(lock, moved)
    except FileNotFoundError:
        return
    try:
        if moved.read_text().strip() != holder:
            try:
                os.link(moved, lock)
            except FileExistsError:
                pass
    finally:
        moved.unlink(missing_ok=True)
