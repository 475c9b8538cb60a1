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

#: the training loop trims at most this often: a trim costs ~6 ms on a ResNet run's heap (0.3 % of 2 s), and without
#: it resident memory crept from 529 to 587 MiB over 600 uniform steps (Fashion-MNIST PNG rows) as freed batch
#: buffers stayed in the heap; with a trim every 50 steps it stayed at 447-459 MiB
TRIM_SECONDS = 2.0


@functools.cache
def _malloc_trim():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def trim_heap() -> bool:
    """Return free heap pages to the OS (glibc `malloc_trim(0)`); True if the C library has it."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
