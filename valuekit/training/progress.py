"""Training progress: a tqdm bar on a terminal, plain lines elsewhere (CI logs, nohup, pipes).

Without a terminal a line goes to stderr every `every_fraction` of the steps or every `every_s`
seconds, whichever comes first (the first one after `first_s` seconds), so a long run under a
scheduler is never silent; each line has the step rate and the estimated time left.
"""

from __future__ import annotations

import sys
import time


def _clock(seconds: float) -> str:
    """H:MM:SS (or M:SS under an hour)."""
    s = int(round(seconds))
    h, m = divmod(s, 3600)
    m, s = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Progress:
    """tqdm-like: update(n), set_postfix(**values), close()."""

    def __init__(self, *, total: int, initial: int = 0, desc: str = "", stream=None, every_s: float = 30.0,
                 every_fraction: float = 0.1, tty: bool | None = None, first_s: float = 5.0):
        self.stream = stream or sys.stderr
        self.total, self.n, self.desc = total, initial, desc
        tty = bool(getattr(self.stream, "isatty", lambda: False)()) if tty is None else tty
        self.bar = None
        if tty:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", file=self.stream)
        self.every_steps = max(1, int(total * every_fraction))
        self.every_s, self.first_s = every_s, first_s
        self.start_n, self.t0 = initial, time.monotonic()
        self.last_n, self.last_t = initial, self.t0
        self.postfix: dict[str, str] = {}

    def set_postfix(self, **values) -> None:
        self.postfix = {k: str(v) for k, v in values.items() if v is not None}
        if self.bar is not None:
            self.bar.set_postfix(**self.postfix)

    def update(self, n: int = 1) -> None:
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        wait = min(self.first_s, self.every_s) if self.last_n == self.start_n else self.every_s
        if self.n - self.last_n >= self.every_steps or now - self.last_t >= wait or self.n == self.total:
            self._line(now)

    def _line(self, now: float) -> None:
        rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
        extra = "".join(f" {k}={v}" for k, v in self.postfix.items())
        pct = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        left = self.total - self.n
        eta = f", ETA {_clock(left / rate)}" if left > 0 and rate > 0 else ""
        shown = f"{rate:.2g}" if rate < 1 else f"{rate:.1f}"  # a slow run is not "0.0 step/s"
        print(f"{self.desc}: step {self.n}/{self.total}{pct}{extra} {shown} step/s{eta}", file=self.stream, flush=True)
        self.last_n, self.last_t = self.n, now

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
