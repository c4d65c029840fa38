"""The transport seam: publish/subscribe bytes on topics. Algorithms and agents never import paho.

:class:`MemoryBus` is the in-process twin used by tests (same topic-filter semantics as MQTT,
synchronous delivery); :class:`edge_sdk.mqtt.MqttTransport` is the real one.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections import defaultdict
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
    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        """Call ``handler(topic, payload)`` for every message matching ``topic_filter`` (also after reconnects)."""

    @abstractmethod
    def close(self) -> None: ...

    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until queued publishes are acknowledged; True when everything went out."""
        return True


class MemoryBus:
    """A tiny in-process broker: retained messages and wildcard subscriptions, synchronous delivery."""

    def __init__(self):
        self._subs: dict[str, list[tuple[str, Handler]]] = defaultdict(list)
        self._retained: dict[str, bytes] = {}
        self._lock = threading.RLock()

    def client(self, client_id: str, will: tuple[str, bytes] | None = None) -> "MemoryTransport":
        return MemoryTransport(self, client_id, will)

    def _publish(self, topic: str, payload: bytes, retain: bool) -> None:
        with self._lock:
            if retain:
                if payload:
                    self._retained[topic] = payload
                else:
                    self._retained.pop(topic, None)
            targets = [h for subs in self._subs.values() for f, h in subs if topic_matches(f, topic)]
        for handler in targets:
            handler(topic, payload)

    def _subscribe(self, client_id: str, topic_filter: str, handler: Handler) -> None:
        with self._lock:
            self._subs[client_id].append((topic_filter, handler))
            retained = [(t, p) for t, p in self._retained.items() if topic_matches(topic_filter, t)]
        for topic, payload in retained:
            handler(topic, payload)

    def _drop(self, client_id: str) -> None:
        with self._lock:
            self._subs.pop(client_id, None)


class MemoryTransport(Transport):
    def __init__(self, bus: MemoryBus, client_id: str, will: tuple[str, bytes] | None = None):
        self.bus, self.client_id, self.will = bus, client_id, will

    def connect(self) -> None:
        pass

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        self.bus._publish(topic, payload, retain)

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1) -> None:
        self.bus._subscribe(self.client_id, topic_filter, handler)

    def close(self) -> None:
        self.bus._drop(self.client_id)

    def crash(self) -> None:
        """Disappear without a clean close: the broker publishes the Last Will."""
        self.bus._drop(self.client_id)
        if self.will:
            self.bus._publish(self.will[0], self.will[1], retain=True)
