"""The transport seam: publish/subscribe bytes on topics. Strategies, agents and the runtime never import paho.

Implementations: :mod:`edgefl_core.transport.mqtt` (paho, the real one) and
:mod:`edgefl_core.transport.memory` (the in-process twin); :func:`edgefl_core.transport.create_transport`
picks one by the broker URL's scheme.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

Handler = Callable[[str, bytes], None]


def topic_matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic-filter matching with ``+`` (one level) and ``#`` (the rest)."""
    f_parts, t_parts = topic_filter.split("/"), topic.split("/")
    for i, part in enumerate(f_parts):
        if part == "#":
            return True
        if i >= len(t_parts) or (part != "+" and part != t_parts[i]):
            return False
    return len(f_parts) == len(t_parts)


class Transport(ABC):
    @abstractmethod
    def connect(self) -> None: ...

    @abstractmethod
    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue ``payload`` for delivery (QoS 1: at least once)."""

    @abstractmethod
    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1, retained: bool = True) -> None:
        """Call ``handler(topic, payload)`` for every message matching ``topic_filter`` (also after reconnects).

        ``retained=False``: messages the broker kept from before (MQTT retained messages, delivered on
        subscribing) are not handed over but cleared (a zero-length retained publish, MQTT 3.3.1.3): on a
        topic where only live messages mean anything, a stale one must not act again at every restart."""

    @property
    def connected(self) -> bool:
        """Whether the broker is reachable now (senders wait instead of queueing while it is not)."""
        return True

    @property
    def taken_over(self) -> bool:
        """Whether another client connected with this client id and took this session over (MQTT 5 reason code
        0x8E). The transport then stops reconnecting, so two processes with one identity never fight for it
        (each reconnect would take the session back); its owner should stop and say why."""
        return False

    @abstractmethod
    def close(self) -> None: ...

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until queued publishes are acknowledged; True when everything went out."""
        return True
