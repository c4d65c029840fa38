"""Ctrl-C for the long-running commands: the first one asks for a clean stop, a second one forces it.

    with CtrlC(runtime.stop.set, "saving the rounds done") as ctrl_c:
        runtime.serve()        # returns soon after the first Ctrl-C; a second raises KeyboardInterrupt
    return EXIT_INTERRUPTED if ctrl_c.pressed else 0
"""
from __future__ import annotations

import logging
import signal
import threading
from typing import Callable

logger = logging.getLogger("edgefl.cli")

EXIT_INTERRUPTED = 130  # 128 + SIGINT: what a shell reports for a command stopped by Ctrl-C


class CtrlC:
    """While active (a ``with`` block on the main thread), SIGINT no longer raises KeyboardInterrupt at once:
    the first calls ``on_first`` (on a helper thread: a handler that sets an Event the main thread may be
    waiting on could deadlock) and logs ``what`` it does; a second raises KeyboardInterrupt, the caller's
    "stop at once" path. Elsewhere (not the main thread) it does nothing."""

    def __init__(self, on_first: Callable[[], None], what: str):
        self.on_first = on_first
        self.what = what
        self.pressed = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.pressed:
            raise KeyboardInterrupt
        self.pressed = True
        logger.warning("interrupted: %s (Ctrl-C again to stop at once)", self.what)
        threading.Thread(target=self.on_first, name="ctrl-c", daemon=True).start()

    def __enter__(self) -> "CtrlC":
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
