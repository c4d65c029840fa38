"""The inbox both the runtime and the agent use: transport callbacks only enqueue; one thread handles."""
from __future__ import annotations

import queue
from typing import Callable


def drain(inbox: queue.Queue, handle: Callable[[str, bytes], None], timeout: float) -> int:
    """Handle every queued ``(topic, payload)``, waiting up to ``timeout`` s for the first; returns how many."""
    try:
        item = inbox.get(timeout=timeout)
    except queue.Empty:
        return 0
    handled = 0
    while True:
        handle(*item)
        handled += 1
        try:
            item = inbox.get_nowait()
        except queue.Empty:
            return handled
