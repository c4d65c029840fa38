"""Progress of the cloud's long compute (server training, evaluation) as log lines, and its interruption.

A :class:`ProgressLog` is told how many samples each batch had; it logs a line at most every
:data:`INTERVAL_S` seconds (time-based: a clock read per batch, no device sync), plus a closing line::

    server round 3 epoch 1/2: 12,800/30,000 samples (43%), 2,950 samples/s, ETA 6 s, loss 0.81

A compute that may be quick (evaluation) passes ``quiet=True``: nothing is logged unless it runs longer
than :data:`QUIET_S`.
Compute that checks the runtime's stop event raises :class:`Interrupted` (Ctrl-C, SIGTERM) between batches.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

INTERVAL_S = 10.0   # at most one progress line per this many seconds (plus the closing line)
QUIET_S = 5.0       # a quiet compute (quiet=True) says nothing when it takes less


class Interrupted(Exception):
    """Long compute stopped between batches because the runtime was asked to stop; its result is discarded."""


def check(stop, what: str) -> None:
    """Raise :class:`Interrupted` when ``stop`` (a threading.Event or None) is set."""
    if stop is not None and stop.is_set():
        raise Interrupted(what)


def duration(seconds: float, tenths: bool = False) -> str:
    """``6 s`` (``tenths``: ``0.4 s`` under 10 s), ``2 min 05 s``, ``1 h 03 min``."""
    if tenths and seconds < 9.95:
        return f"{max(seconds, 0.0):.1f} s"
    s = int(round(max(seconds, 0.0)))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


class ProgressLog:
    def __init__(self, logger: logging.Logger, label: str, total: int, *, after: int = 0, quiet: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        """``total``: samples of this pass; ``after``: samples still to come after it in the same job (later
        epochs: the line then also gives the job's ETA); ``quiet``: log nothing unless it runs longer than
        :data:`QUIET_S`."""
        self.logger, self.label, self.total, self.after = logger, label, total, after
        self.interval_s = INTERVAL_S
        self.quiet_s = QUIET_S if quiet else 0.0
        self.clock = clock
        self.done = 0
        self.lines = 0
        self.start = clock()
        self._next = self.start + max(self.interval_s, self.quiet_s)

    def update(self, samples: int, loss: float | None = None) -> None:
        """``samples`` more are done; ``loss``: the running mean so far (shown when a line is due)."""
        self.done += samples
        now = self.clock()
        if now >= self._next:
            self._log(now, loss, final=False)
            self._next = now + self.interval_s

    def finish(self, loss: float | None = None) -> None:
        """The closing line (quiet: only when it took longer than :data:`QUIET_S`, or said anything before)."""
        now = self.clock()
        if self.lines or now - self.start >= self.quiet_s:
            self._log(now, loss, final=True)

    def _log(self, now: float, loss: float | None, final: bool) -> None:
        elapsed = now - self.start
        rate = self.done / elapsed if elapsed > 0 else 0.0
        parts = [f"{self.label}: {self.done:,}/{self.total:,} samples ({100 * self.done / max(self.total, 1):.0f}%)",
                 f"{rate:,.0f} samples/s"]
        if final:
            parts.append(f"took {duration(elapsed, tenths=True)}")
        elif rate > 0:
            parts.append(f"ETA {duration((self.total - self.done) / rate)}")
            if self.after:
                parts.append(f"all epochs ETA {duration((self.total - self.done + self.after) / rate)}")
        if loss is not None:
            parts.append(f"loss {loss:.3g}")
        self.logger.info(", ".join(parts))
        self.lines += 1
