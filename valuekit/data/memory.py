"""Give freed heap memory back to the operating system (after scoring chunks, and every few seconds of training).

Why: scoring every training row in chunks allocates large activations and, between them, small results
and decoded images that stay alive. glibc then cannot reuse the freed large blocks whole, and its heap
(and the resident set) grew with the number of chunks, i.e. with the number of rows: +184 MiB of peak
memory from 10k to 60k rows for HOST-CP's final scores (reports/stream.md). `malloc_trim` returns the
free pages inside the heap to the system; on other C libraries there is nothing to do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

import numpy as np

#: the training loop trims at most this often: a trim costs ~6 ms on a ResNet run's heap (0.3 % of 2 s), and without
#: it resident memory crept from 529 to 587 MiB over 600 uniform steps (Fashion-MNIST PNG rows) as freed batch
#: buffers stayed in the heap; with a trim every 50 steps it stayed at 447-459 MiB
TRIM_SECONDS = 2.0


@functools.cache
def _glibc(name: str):
    """The C library's function `name`, or None where it has none (not glibc)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _malloc_trim():
    return _glibc("malloc_trim")


def trim_heap() -> bool:
    """Return free heap pages to the OS (glibc `malloc_trim(0)`); True if the C library has it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


#: with a fixed threshold, allocations of at least this many bytes get their own mapping, returned whole to the
#: system when freed. glibc's default threshold instead rises to the size of the largest mapped block the process
#: has freed (up to 32 MiB), which made a run's peak depend on what it had freed before: BADS on a causal LM peaked
#: +66 to +82 MiB higher at 50k rows than at 10k by default, +6 / +25 with 4 MiB fixed (reports/llm-memory.md).
#: Not fixed for other tables: every buffer above it then costs fresh pages, and a ResNet step on a CPU took ~10 %
#: longer; a causal-LM step's buffers stayed below it (same step time, measured in the same comparison).
MMAP_THRESHOLD = 4 << 20
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MALLOC_MODES = ("auto", "steady", "default")  # $VALUEKIT_MALLOC


@functools.cache
def fix_mmap_threshold(*, causal_lm: bool = False, nbytes: int = MMAP_THRESHOLD) -> bool:
    """Fix glibc's mmap threshold at `nbytes` (mallopt M_MMAP_THRESHOLD; the loaders and the training loop call
    this before allocating) when $VALUEKIT_MALLOC is "steady", or "auto" (the default) and `causal_lm` (instruction
    rows for a causal LM); never with "default". Once set it holds for the process. True when set here."""
    import os

    from valuekit.errors import InputError

    mode = os.environ.get("VALUEKIT_MALLOC", "") or "auto"
    if mode not in MALLOC_MODES:
        raise InputError(f"$VALUEKIT_MALLOC={mode!r}: choose from {', '.join(MALLOC_MODES)}")
    if mode == "default" or (mode == "auto" and not causal_lm):
        return False
    mallopt = _glibc("mallopt")
    return mallopt is not None and bool(mallopt(M_MMAP_THRESHOLD, int(nbytes)))


def shared_strings(values) -> np.ndarray:
    """A column as an object array of str in which equal values are one Python object: a task or source column
    costs a pointer a row (pandas' Arrow strings give every row its own str object, ~60 bytes: 57 MiB a million
    rows). Values as `Series.astype(str)` writes them."""
    import numpy as np
    import pandas as pd

    codes, uniques = pd.factorize(pd.Series(values).astype(str), use_na_sentinel=False)
    return np.asarray(list(uniques), dtype=object)[codes]
