"""What the runtime tells its operator while it runs: recent events, the live phase of the round, and the
Prometheus counters (``docs/CONSOLE.md``).

The serve thread writes all of it; the console's thread only reads (a deque append and the replacement of
the ``phase`` dict are atomic under the GIL, so no lock is taken on the serve thread's path). Counters are
``prometheus_client`` objects: with ``PROMETHEUS_MULTIPROC_DIR`` set they live in the library's
multiprocess files, so several processes that ingest add up on one ``/metrics`` (the library's
multiprocess mode); otherwise they belong to this runtime's own registry.
"""
from __future__ import annotations

import itertools
import os
import re
import time
import unicodedata
from collections import deque

from prometheus_client import CollectorRegistry, Counter

from edgefl_core.config import ConfigError

EVENTS_KEPT = 500          # the console shows the most recent of these
DEVICE_EVENTS_PER_MINUTE = 6   # more from one device in a minute are counted, not kept (one device cannot
ALWAYS_KEPT = ("quarantined", "released")   # flush the feed); these are kept whatever the rate
_LABEL = re.compile(r"[a-z0-9_]{1,40}")


def multiprocess_dir() -> str | None:
    """The library's multiprocess directory (``PROMETHEUS_MULTIPROC_DIR``), or None for one process."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


def printable(text: str) -> str:
    """``text`` with control and format characters (newlines, bidi overrides, zero-width) shown as U+FFFD:
    what a sender wrote cannot rearrange or hide a line of the console."""
    return "".join("\ufffd" if unicodedata.category(c) in ("Cc", "Cf") else c for c in text)


def label_value(value: str) -> str:
    """A bounded label value: a reason code as the runtime names it, else ``other`` (label cardinality must
    not grow with what a sender writes)."""
    return value if isinstance(value, str) and _LABEL.fullmatch(value) else "other"


class RuntimeCounters:
    """The run's Prometheus counters (names follow Prometheus' conventions: ``_total``, base units).

    Each counts since this process started (a restart resets them, which ``rate()`` handles); the run's
    totals across restarts are ``report.json``'s."""

    def __init__(self):
        self.registry = CollectorRegistry(auto_describe=True)
        path = multiprocess_dir()
        if path and not os.path.isdir(path):
            raise ConfigError(f"PROMETHEUS_MULTIPROC_DIR={path} is not a directory: create it (empty, before the "
                              "processes start: prometheus_client's multiprocess mode) or unset it")
        into = None if path else self.registry   # multiprocess: the library's files hold them
        self.messages = Counter("edgefl_messages_received", "MQTT messages the runtime handled", registry=into)
        self.uplink_bytes = Counter(
            "edgefl_uplink_bytes", "Uplink wire bytes by what became of them (accepted: an accepted transfer's "
            "first copy; resent: copies of what was held; rejected: refused chunks and transfers)", ["outcome"],
            registry=into)
        self.downlink_bytes = Counter("edgefl_downlink_bytes", "Bytes the runtime sent to devices", registry=into)
        self.rejections = Counter("edgefl_rejected_messages", "Rejected messages by reason", ["reason"],
                                  registry=into)
        self.quarantines = Counter("edgefl_quarantines", "Devices quarantined (consecutive rejections)",
                                   registry=into)
        self.rounds = Counter("edgefl_rounds_completed", "Rounds completed (async: server updates)", registry=into)
        self.accepted_samples = Counter("edgefl_accepted_samples", "Training samples of the uploads each "
                                        "completed round trained on", registry=into)
        for outcome in ("accepted", "resent", "rejected"):  # every outcome's series exists from the start, at 0
            self.uplink_bytes.labels(outcome=outcome)

    def bytes(self, kind: str, wire: int) -> None:
        """``kind``: ``up`` | ``resent`` | ``rejected`` | ``down`` (``cloud_runtime/ingest.py``'s BYTE_KINDS)."""
        if kind == "down":
            self.downlink_bytes.inc(wire)
        else:
            self.uplink_bytes.labels(outcome="accepted" if kind == "up" else kind).inc(wire)


class Telemetry:
    """Events, phase and counters of one runtime.

    ``phase``: ``{"name", "round", "since" (epoch s), "done", "total"}`` (samples of the server's compute:
    ``done``/``total`` is its progress); ``events``: dicts ``{"seq", "time", "kind", "device", "detail"}``."""

    def __init__(self):
        self.events: deque = deque(maxlen=EVENTS_KEPT)
        self.events_suppressed = 0                 # device events over DEVICE_EVENTS_PER_MINUTE, not kept
        self._device_events: dict = {}             # device -> times of its recent events
        self._seq = itertools.count(1)
        self.counters = RuntimeCounters()
        self.phase: dict = {"name": "starting", "round": None, "since": time.time(), "done": 0, "total": 0}
        self.on_phase = None   # called (serve thread) after each phase change: the runtime rebuilds the views

    def event(self, kind: str, device: str | None = None, detail: str = "") -> None:
        """Keep an event (``detail``: cut to 300 characters, control characters shown as U+FFFD). A device's
        events beyond :data:`DEVICE_EVENTS_PER_MINUTE` are only counted (``events_suppressed``), except
        :data:`ALWAYS_KEPT`."""
        now = time.time()
        if device is not None and kind not in ALWAYS_KEPT:
            if len(self._device_events) > 10_000:
                self._device_events.clear()
            recent = [t for t in self._device_events.get(device, ()) if now - t < 60.0]
            if len(recent) >= DEVICE_EVENTS_PER_MINUTE:
                self.events_suppressed += 1
                self._device_events[device] = recent
                return
            self._device_events[device] = recent + [now]
        self.events.append({"seq": next(self._seq), "time": now, "kind": kind, "device": device,
                            "detail": printable(str(detail)[:300])})

    def set_phase(self, name: str, round_: int | None = None, total: int = 0) -> None:
        self.phase = {"name": name, "round": round_, "since": time.time(), "done": 0, "total": int(total)}
        if self.on_phase is not None:
            self.on_phase()

    def progress(self, samples: int) -> None:
        """``samples`` more of the current phase's compute are done."""
        self.phase["done"] = self.phase.get("done", 0) + samples

    def recent(self, n: int = 50) -> list[dict]:
        """The last ``n`` events, newest first."""
        return list(itertools.islice(reversed(self.events.copy()), n))
