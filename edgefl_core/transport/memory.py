"""The in-process twin of the broker: retained messages, wildcard subscriptions, Last Will.

Delivery is synchronous (the publisher's thread calls the handlers); every handler in this project
only enqueues, so that is safe. ``memory://<name>`` URLs share one named bus per process, which is how
``edgefl-sim --transport memory`` runs the real runtime and real agents in threads.
"""
from __future__ import annotations

import threading
from collections import defaultdict

from edgefl_core.transport.base import Handler, Transport, topic_matches

_BUSES: dict[str, "MemoryBus"] = {}
_BUSES_LOCK = threading.Lock()


class MemoryBus:
    """A tiny in-process broker: retained messages and wildcard subscriptions, synchronous delivery."""

    @classmethod
    def named(cls, name: str) -> "MemoryBus":
        """The process-wide bus called ``name`` (created on first use)."""
        with _BUSES_LOCK:
            return _BUSES.setdefault(name, cls())

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

    def _subscribe(self, client_id: str, topic_filter: str, handler: Handler, keep_retained: bool = True) -> None:
        with self._lock:
            self._subs[client_id].append((topic_filter, handler))
            retained = [(t, p) for t, p in self._retained.items() if topic_matches(topic_filter, t)]
            if not keep_retained:  # dropped and cleared, as the MQTT transport does
                for topic, _ in retained:
                    del self._retained[topic]
                retained = []
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

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1, retained: bool = True) -> None:
        self.bus._subscribe(self.client_id, topic_filter, handler, retained)

    def close(self) -> None:
        self.bus._drop(self.client_id)

    def crash(self) -> None:
        """Disappear without a clean close: the broker publishes the Last Will."""
        self.bus._drop(self.client_id)
        if self.will:
            self.bus._publish(self.will[0], self.will[1], retain=True)
