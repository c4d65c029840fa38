"""Waiting for a broker the way a daemon should: forever, with capped backoff, saying what it waits for."""
from __future__ import annotations

import logging
import threading

from edgefl_core.config import ConfigError
from edgefl_core.transport.base import Transport

logger = logging.getLogger(__name__)


def connect_patiently(transport: Transport, stop: threading.Event, who: str, *, first_delay_s: float = 1.0,
                      max_delay_s: float = 60.0) -> bool:
    """Connect ``transport``, retrying after refused / unreachable / no-answer errors with doubling delays
    capped at ``max_delay_s``, each attempt's reason logged. Returns True once connected, False when ``stop``
    was set while waiting. Raises ConfigError (wrong credentials, a certificate that does not verify): no
    retry can fix those."""
    delay = first_delay_s
    while True:  # a daemon that boots before the network or the broker waits for them
        try:
            transport.connect()
            return True
        except ConfigError:
            raise
        except ConnectionError as e:
            logger.warning("%s: waiting for the broker: %s; retrying in %.0fs", who, e, delay)
            if stop.wait(delay):
                return False
            delay = min(2 * delay, max_delay_s)
