"""The inbox the runtime, the ingest workers and the agent use: transport callbacks only enqueue; one thread
handles, in arrival order. Each message remembers when it arrived, so a handler that is behind knows how far
it has caught up: a deadline, an expiry or a silence is judged at that time, not at the wall clock's, and a
message still queued is never taken for one that did not come."""
from __future__ import annotations

import queue
import time
from typing import Callable

DRAIN_BUDGET_S = 0.5  # the longest one drain handles messages before its caller's periodic work runs again


class Inbox:
    """``put(topic, payload)`` from any thread; :meth:`drain` on the handling one."""

    def __init__(self):
        self._queue: queue.Queue = queue.Queue()

    def put(self, topic: str, payload: bytes, arrived: float | None = None) -> None:
        """Queue a message; ``arrived``: its ``time.monotonic()`` (now, unless a test replays a past)."""
        self._queue.put((topic, payload, time.monotonic() if arrived is None else arrived))

    def drain(self, handle: Callable[[str, bytes], None], timeout: float, budget_s: float = DRAIN_BUDGET_S,
              clock: Callable[[], float] = time.monotonic) -> int:
        """Handle what is queued, waiting up to ``timeout`` s for the first; returns how many. Returns once the
        inbox is empty or ``budget_s`` s have passed since the first was taken, whichever comes first: a backlog
        that refills as fast as it is handled (a fleet uploading at once, one device flooding) must not starve
        the caller's periodic work (deadlines, expiries, presence renewals), which runs between drains."""
        try:
            topic, payload, _ = self._queue.get(timeout=timeout)
        except queue.Empty:
            return 0
        handled, start = 0, clock()
        while True:
            handle(topic, payload)
            handled += 1
            if clock() - start >= budget_s:
                return handled
            try:
                topic, payload, _ = self._queue.get_nowait()
            except queue.Empty:
                return handled

    def handled_up_to(self) -> float:
        """``time.monotonic()`` up to which every message has been handled: when the oldest one still queued
        arrived, or now when none is."""
        with self._queue.mutex:
            return self._queue.queue[0][2] if self._queue.queue else time.monotonic()

    def empty(self) -> bool:
        return self._queue.empty()

    def qsize(self) -> int:
        return self._queue.qsize()

    def clear(self) -> None:
        """Drop what is queued (tests: as if it never came)."""
        with self._queue.mutex:
            self._queue.queue.clear()


def drain(inbox: Inbox, handle: Callable[[str, bytes], None], timeout: float, budget_s: float = DRAIN_BUDGET_S,
          clock: Callable[[], float] = time.monotonic) -> int:
    """:meth:`Inbox.drain` (the form the serve loops and tests call)."""
    return inbox.drain(handle, timeout, budget_s, clock)
