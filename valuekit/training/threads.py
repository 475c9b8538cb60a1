"""How many CPU threads torch uses for a valuekit command: `--threads N`, `VALUEKIT_THREADS`, or a measured default.

The trap this avoids: torch starts one intra-op thread per core.  The built-in models (linear, mlp,
cnn) run steps of a few milliseconds made of many small kernels; each parallel region is a barrier
where the threads wait for each other, and on a machine that another process keeps busy a waiting
thread is often descheduled for a whole time slice.  A CLI run with torch's default threads was
measured ~10x slower than with one thread while another process was busy (reports/speed.md), and the exact
subset layer 190 ms instead of 2.7 ms per call (that layer now always solves on one thread,
`valuekit.ops.selection`).  On an idle machine a second thread gains little at these sizes
(reports/speed.md, thread table).  So the default is one thread for the small built-in models.  For
anything larger (the resnet-style model, a user's model) threads can pay on an idle machine, but the
same trap was measured there too (resnet, batch 128, 2 cores, load ~13: 0.19 s per step on one thread,
5 s on two), so the default is torch's count minus the cores already busy (1-minute load average),
at least 1: all cores on an idle machine, one on a loaded one.
"""

from __future__ import annotations

import math
import os

from valuekit.errors import InputError

ENV = "VALUEKIT_THREADS"
#: models whose CPU steps are too small for intra-op parallelism to pay (measured, reports/speed.md)
SMALL_MODELS = ("linear", "mlp", "cnn")


def parse_threads(value, *, where: str = "--threads") -> int | None:
    """A thread count from the command line or environment: None (not given) or an int >= 1."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        n = int(value)
    except (TypeError, ValueError):
        raise InputError(f"{where} {value!r}: expected a whole number of threads >= 1") from None
    if n < 1:
        raise InputError(f"{where} {value!r}: expected a whole number of threads >= 1")
    limit = max_threads()
    if n > limit:  # tens of thousands of threads make no progress and stop answering signals
        raise InputError(f"{where} {value!r}: at most {limit} threads on this machine ({limit // 4} cores x 4)")
    return n


def max_threads() -> int:
    """The most threads valuekit starts: four per core this process may use."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return 4 * max(1, cores)


def idle_cores(cores: int, load: float | None) -> int:
    """Cores not already busy: cores - ceil(load - 0.5), at least 1 (load None: all cores)."""
    if load is None:
        return max(1, cores)
    return max(1, min(cores, cores - math.ceil(load - 0.5)))


def default_threads(model: str | None = None, device: str | None = None, *, cores: int | None = None,
                    load: float | None = -1.0) -> int:
    """The measured default: 1 for the small built-in models (and for CUDA runs, where the host only launches
    kernels), else torch's thread count limited to the idle cores (`idle_cores` of the 1-minute load average)."""
    if (device is not None and str(device).startswith("cuda")) or model is None or model in SMALL_MODELS:
        return 1
    if cores is None:
        import torch

        cores = torch.get_num_threads()
    if load == -1.0:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):  # not available on this platform
            load = None
    return idle_cores(cores, load)


def resolve_threads(threads=None, *, model: str | None = None, device: str | None = None) -> int:
    """Thread count to use: explicit `threads` > $VALUEKIT_THREADS > `default_threads(model, device)`."""
    n = parse_threads(threads)
    if n is None:
        n = parse_threads(os.environ.get(ENV), where=f"${ENV}")
    if n is None:
        n = default_threads(model, device)
    return n


def apply_threads(threads=None, *, model: str | None = None, device: str | None = None) -> int:
    """Set torch's intra-op thread count by the policy above; returns the count now in effect."""
    import torch

    n = resolve_threads(threads, model=model, device=device)
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    return torch.get_num_threads()
