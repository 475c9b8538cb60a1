"""Where valuekit may write, and reading run files that may be damaged.

Every command checks its output location with `check_output` before any work: an output that is
empty, an input, a run directory's own file, an existing directory where a file is meant (or a
file where a folder is meant), a path under a file, or a location that cannot be written is refused
with one InputError. `unreadable` is the one message for a damaged run file.
"""


from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from valuekit.errors import InputError, RunDirError, unreadable


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def _run_dir_of(path: Path) -> Path | None:
    """The run directory `path` lies in (any ancestor holding run.json), or None."""
    from valuekit.runs.layout import RUN_JSON

    for parent in path.parents:
        if (parent / RUN_JSON).is_file():
            return parent
    return None


def _writable_dir(folder: Path) -> bool:
    """True when a file can be created in `folder` (a real probe: os.access says yes to root on read-only mounts)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return False
    try:
        fd, probe = tempfile.mkstemp(prefix=".valuekit-probe-", dir=folder)
    except OSError:
        return False
    os.close(fd)
    os.unlink(probe)
    return True


def _special(path: Path) -> str:
    """What a path that is neither a file nor a folder is ("a character device", ...)."""
    import stat

    mode = path.stat().st_mode
    for test, what in ((stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a file or folder"


def _holder(run_dir: Path) -> str:
    """host:pid of the process that holds a run directory's lock ('unknown' when unreadable)."""
    from valuekit.runs.layout import LOCK

    try:
        return (run_dir / LOCK).read_text().strip() or "unknown"
    except (OSError, UnicodeDecodeError):
        return "unknown"


def check_output(path, *, option: str = "-o", kind: str = "file", inputs=(), runs=(),
                 suffixes: tuple[str, ...] | None = None, overwrite: bool | None = None) -> Path:
    """Resolve and check an output location before any work; returns the resolved path.

    kind: "file" (a directory is refused; an existing file is refused unless `overwrite` is True, or
    None: the caller decides), "dir" (a folder that is
    created if missing; a file there is refused) or "run" (a run directory: a file there is refused,
    and so is a non-empty folder that is not a run directory). `inputs` are files the command reads
    (never an output), `runs` are run directories it reads (neither they nor anything in them is an
    output).
    """
    text = "" if path is None else str(path)
    if not text.strip():
        raise InputError(f"{option} {text!r}: empty path; give a {'file name' if kind == 'file' else 'folder'}")
    given = Path(text).expanduser()
    out = given.resolve()
    label = f"{option} {text}"
    if out.exists() and not (out.is_file() or out.is_dir()):  # a device, a FIFO, a socket: said before its name
        via = f"is a link to {out}, which " if given.is_symlink() or given.absolute() != out else ""
        want = "a regular file" if kind == "file" else "a folder"
        raise InputError(f"{label}: {via}is {_special(out)}, not {want}; valuekit writes only files and folders")
    if suffixes is not None and out.suffix.lower() not in suffixes:
        shown = [s for s in suffixes if s not in (".pq", ".htm")]  # aliases accepted, not advertised
        raise InputError(f"{label}: output must end in {' or '.join(shown)}")
    for inp in inputs:
        if inp is None:
            continue
        p = Path(inp).expanduser().resolve()
        if out == p or (out.exists() and p.exists() and os.path.samefile(out, p)):
            what = "folder" if p.is_dir() else "table"
            raise InputError(f"{label}: is the input {what} {inp}; valuekit never overwrites its input")
    for r in runs:
        rp = Path(r).expanduser().resolve()
        if out == rp or out.is_relative_to(rp):
            raise InputError(f"{label}: lies in the run directory {r}; write outputs elsewhere")
    from valuekit.runs.layout import RUN_FILES, RUN_JSON
    from valuekit.runs.lock import lock_held

    inside = _run_dir_of(out)
    if inside is not None:
        what = "is a file of" if out.relative_to(inside).parts[0] in RUN_FILES else "lies in"
        raise InputError(f"{label}: {what} the run directory {inside}; write outputs elsewhere")
    if out.exists():
        if kind == "file" and out.is_dir():
            raise InputError(f"{label}: is a directory; give a file name")
        if kind != "file" and not out.is_dir():
            raise InputError(f"{label}: exists and is a file, not a folder")
        if kind == "run" and not (out / RUN_JSON).exists() and lock_held(out):
            # another process has just made the folder and holds its lock, run.json not yet written: the loser of
            # a race to create one run directory is told so, not that the folder is not a run
            raise RunDirError(f"{label}: run directory is in use by another valuekit process ({_holder(out)}) that "
                              f"is creating a run there; wait for it or choose another folder")
        if kind == "run" and not (out / RUN_JSON).exists() and any(out.iterdir()):
            raise InputError(f"{label}: is a folder that is not empty and holds no valuekit run; "
                             f"choose a new or empty folder")
        if kind == "file" and overwrite is not None:
            refuse_existing(given, overwrite=overwrite, option=option)
    base = _nearest_existing(out.parent if kind == "file" or not out.exists() else out)
    if not base.is_dir():
        raise InputError(f"{label}: lies under {base}, which is a file, not a folder")
    if not _writable_dir(base):
        raise InputError(f"{label}: cannot write in {base} (permission denied or read-only)")
    return out


def refuse_existing(path, *, overwrite: bool, option: str = "-o", arg: str = "out", of: str | None = None) -> None:
    """Refuse an output file that exists unless `overwrite`: valuekit never replaces a file silently. The message
    speaks of `arg=` and `overwrite=True`; its command-line form of `option` and `--overwrite`. `of`: the main output
    when `path` is a file written next to it (an audit's summary), named in the message instead."""
    p = Path(path).expanduser()
    if overwrite or not (p.exists() or p.is_symlink()):
        return
    what = "already exists" if of is None else f"its companion file {path} already exists"
    shown = path if of is None else of
    raise InputError(f"{arg}={str(shown)!r}: {what}; pass overwrite=True to replace it, or choose another {arg}",
                     cli=f"{option} {shown}: {what}; pass --overwrite to replace it, or choose another {option}")


def check_not_overwritten(folder, names, *, option: str = "-o", flag: str = "--overwrite") -> None:
    """Refuse an output folder that already holds any of `names` (files or folders a writer would replace):
    valuekit never overwrites a user's file unless told to (`flag`)."""
    folder = Path(folder).expanduser()
    there = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    if there:
        raise InputError(f"{option} {folder}: already holds {there[0]}"
                         f"{f' (and {len(there) - 1} more of the files it would write)' if len(there) > 1 else ''}; "
                         f"choose another folder or pass {flag}")


def _kind(t: pa.DataType) -> str:
    if pa.types.is_integer(t):
        return "int"
    if pa.types.is_floating(t):
        return "float"
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return "str"
    if pa.types.is_boolean(t):
        return "bool"
    if pa.types.is_null(t):
        return "null"
    return str(t)


# The columns a reader relies on, with the kinds of Arrow type each may have (all-null columns are
# written as nulls when a method has no such signal).
REQUIRED = {
    "values": {"example_id": {"int", "str"}, "value": {"float", "int"}, "value_std": {"float", "int", "null"},
               "weight": {"float", "int"}, "rank": {"int", "float"}},
    "steps": {"step": {"int"}, "example_id": {"int", "str"}},  # other columns are read where a reader needs them
    "metrics": {"step": {"int"}},
    "sources": {"step": {"int"}, "source": {"str"}, "prob": {"float"}},
}


def check_columns(path: Path, schema: pa.Schema, need: dict) -> None:
    for name, kinds in need.items():
        if name not in schema.names:
            raise unreadable(path, f"no column {name!r}; not a valuekit file")
        kind = _kind(schema.field(name).type)
        if kind not in kinds:
            raise unreadable(path, f"column {name!r} is {schema.field(name).type}, expected {'/'.join(sorted(kinds))}")


def remove_run_files(run_dir: Path, names) -> None:
    """Remove the run's files `names` (files or folders) from `run_dir`, whose lock the caller holds; other files
    in the folder stay. Said on stderr: a run is never replaced silently."""
    import shutil
    import sys

    print(f"valuekit: replacing the run in {run_dir} (overwrite)", file=sys.stderr)
    for name in names:
        p = Path(run_dir) / name
        if p.is_dir():
            shutil.rmtree(p)
        else:
            p.unlink(missing_ok=True)


def data_difference(old, new) -> str:
    """"data (...)" naming each table (train, dev, test) whose fingerprint differs between a run and a resume."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return "data"
    parts = []
    for t in [t for t in sorted(set(old) | set(new)) if old.get(t) != new.get(t)]:
        if old.get(t) is None:
            parts.append(f"{t} table: the run was made without one, this call gives one")
        elif new.get(t) is None:
            parts.append(f"{t} table: the run was made with one, this call gives none")
        else:
            parts.append(f"{t} table: other rows or contents (fingerprint {old[t]} in the run, {new[t]} now)")
    return f"data ({'; '.join(parts)})"


def make_run_dir(run_dir: Path) -> bool:
    """Create run_dir (and parents); True only when this call created it, so that a caller that fails
    later removes only a folder it made itself."""
    try:
        Path(run_dir).mkdir(parents=True)
        return True
    except FileExistsError:
        if not Path(run_dir).is_dir():
            raise RunDirError(f"{run_dir}: exists and is not a folder") from None
        return False


def remove_if_empty(run_dir: Path) -> None:
    """Remove a folder this process created, only while it is still empty (another process may have
    started using it)."""
    try:
        Path(run_dir).rmdir()
    except OSError:
        pass


CHECKPOINT_KEYS = {"step": int, "trainer": dict, "sampler": dict, "parts": dict, "elapsed": (int, float)}


def check_parts(run_dir: Path, counts: dict, *, world_size: int = 1) -> None:
    """The parts a resumed run continues (those the checkpoint counts) are there and are whole Parquet files of
    their table (footer and columns; a truncated part has no footer), else `InputError("RUN/.../part: ...")`."""
    for table, n in counts.items():
        folders = [run_dir / table]
        if table == "steps" and world_size > 1:
            folders = [run_dir / table / f"rank-{r}" for r in range(world_size)]
        for folder in folders:
            for i in range(n):
                part = folder / f"part-{i:05d}.parquet"
                if not part.is_file():
                    raise unreadable(part, "missing; the checkpoint continues after it")
                try:
                    schema = pq.read_schema(part)
                except Exception as exc:
                    raise unreadable(part, exc) from None
                check_columns(part, schema, REQUIRED[table])
