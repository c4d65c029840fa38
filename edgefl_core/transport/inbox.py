"""The inbox the runtime, the ingest workers and the agent use: transport callbacks only enqueue; one thread
handles, in arrival order. Each message remembers when it arrived, so a handler that is behind knows how far
it has caught up: a deadline, an expiry or a silence is judged at that time, not at the wall clock's, and a
message still queued is never taken for one that did not come."""
from __future__ import annotations

import queue
import threading
import time
from typing import Callable

DRAIN_BUDGET_S = 0.5  # the longest one drain handles messages before its caller's periodic work runs again
MESSAGE_OVERHEAD = 512  # bytes a queued message costs besides its payload (topic, tuple, objects): an empty
#                         message is not free


class Inbox:
    """``put(topic, payload)`` from any thread; :meth:`drain` on the handling one. ``sender(topic, payload)``
    names whose bound a message counts toward (None: no bound); each sender's queued bytes (payload plus
    :data:`MESSAGE_OVERHEAD` each) are bounded by ``max_bytes_per_sender``, and what would exceed it is
    dropped and counted (:meth:`take_dropped`): the handling thread may be busy for minutes (server training),
    and a sender that publishes meanwhile must not fill the memory. A sender whose chunks were dropped re-sends
    them when it asks what arrived (``edgefl_core/reliable.py``)."""

    def __init__(self, sender: Callable[[str, bytes], str | None] = lambda topic, payload: None,
                 max_bytes_per_sender: int | None = None):
        self._queue: queue.Queue = queue.Queue()
        self._sender, self._max = sender, max_bytes_per_sender
        self._lock = threading.Lock()
        self._queued: dict[str, int] = {}                 # sender -> bytes queued
        self._dropped: dict[str, list[int]] = {}          # sender -> [messages, bytes] dropped since taken

    def put(self, topic: str, payload: bytes, arrived: float | None = None) -> bool:
        """Queue a message (False: dropped, its sender's bound reached); ``arrived``: its ``time.monotonic()``
        (now, unless a test replays a past)."""
        sender = self._sender(topic, payload) if self._max is not None else None
        if sender is not None:
            with self._lock:
                queued = self._queued.get(sender, 0)
                if queued + len(payload) + MESSAGE_OVERHEAD > self._max:
                    counts = self._dropped.setdefault(sender, [0, 0])
                    counts[0] += 1
                    counts[1] += len(payload)
                    return False
                self._queued[sender] = queued + len(payload) + MESSAGE_OVERHEAD
        self._queue.put((topic, payload, time.monotonic() if arrived is None else arrived, sender))
        return True

    def _taken(self, sender: str | None, payload: bytes) -> None:
        if sender is not None:
            with self._lock:
                left = self._queued.get(sender, 0) - len(payload) - MESSAGE_OVERHEAD
                if left > 0:
                    self._queued[sender] = left
                else:
                    self._queued.pop(sender, None)

    def take_dropped(self) -> dict[str, tuple[int, int]]:
        """``{sender: (messages, bytes)}`` dropped since the last call."""
        with self._lock:
            dropped, self._dropped = self._dropped, {}
        return {k: (v[0], v[1]) for k, v in dropped.items()}

    def drain(self, handle: Callable[[str, bytes], None], timeout: float, budget_s: float = DRAIN_BUDGET_S,
              clock: Callable[[], float] = time.monotonic) -> int:
        """Handle what is queued, waiting up to ``timeout`` s for the first; returns how many. Returns once the
        inbox is empty or ``budget_s`` s have passed since the first was taken, whichever comes first: a backlog
        that refills as fast as it is handled (a fleet uploading at once, one device flooding) must not starve
        the caller's periodic work (deadlines, expiries, presence renewals), which runs between drains."""
        try:
            topic, payload, _, sender = self._queue.get(timeout=timeout)
        except queue.Empty:
            return 0
        handled, start = 0, clock()
        while True:
            self._taken(sender, payload)
            handle(topic, payload)
            handled += 1
            if clock() - start >= budget_s:
                return handled
            try:
                topic, payload, _, sender = self._queue.get_nowait()
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
        with self._lock:
            self._queued.clear()


def drain(inbox: Inbox, handle: Callable[[str, bytes], None], timeout: float, budget_s: float = DRAIN_BUDGET_S,
          clock: Callable[[], float] = time.monotonic) -> int:
    """:meth:`Inbox.drain` (the form the serve loops and tests call)."""
    return inbox.drain(handle, timeout, budget_s, clock)
