"""The inbox both the runtime and the agent use: transport callbacks only enqueue; one thread handles."""
from __future__ import annotations

import queue
import time
from typing import Callable

DRAIN_BUDGET_S = 0.5  # the longest one drain handles messages before its caller's periodic work runs again


def drain(inbox: queue.Queue, handle: Callable[[str, bytes], None], timeout: float,
          budget_s: float = DRAIN_BUDGET_S, clock: Callable[[], float] = time.monotonic) -> int:
    """Handle what is queued ``(topic, payload)``, waiting up to ``timeout`` s for the first; returns how many.
    Returns once the inbox is empty or ``budget_s`` s have passed since the first was taken, whichever comes
    first: a backlog that refills as fast as it is handled (a fleet uploading at once, one device flooding)
    must not starve the caller's deadlines, expiries and presence renewals, which run between drains."""
    try:
        item = inbox.get(timeout=timeout)
    except queue.Empty:
        return 0
    handled, start = 0, clock()
    while True:
        handle(*item)
        handled += 1
        if clock() - start >= budget_s:
            return handled
        try:
            item = inbox.get_nowait()
        except queue.Empty:
            return handled
