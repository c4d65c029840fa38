"""The console's views of a running runtime: ``status``, ``devices`` and ``rounds`` as JSON-able values.

:class:`StatusBoard` is the hand-over between the two threads. The serve thread rebuilds the views in
:meth:`StatusBoard.refresh` (from :meth:`CloudRuntime.pump`, between messages) at most every
``refresh_s`` seconds and only while someone has read them in the last :data:`WATCHED_S` seconds, then
publishes them by replacing one reference; the console's thread only reads the published value. So a
reader never blocks the serve thread, and with nobody watching the console costs ingest nothing.
While the serve thread computes (server training, evaluation) the views keep their ``as_of`` time; the
live phase and its progress come from :class:`~cloud_runtime.telemetry.Telemetry` at read time.
"""
from __future__ import annotations

import logging
import math
import re
import time
from collections import Counter, deque

from cloud_runtime.strategies import strategy_name
from cloud_runtime.telemetry import printable

logger = logging.getLogger("edgefl.runtime")

WATCHED_S = 30.0          # a read keeps the views fresh for this long (Prometheus scrapes every 15 s by default)
RATE_WINDOW_S = 10.0      # the ingest rate is measured over about this long
PREDICTIONS_KEPT = 256    # step-time predictions cached by (recipe, profile, engine)


class StatusBoard:
    """``views``: ``{"status": dict, "devices": list[dict], "rounds": list[dict]}``; ``as_of``: epoch seconds
    of the last rebuild (0: never)."""

    def __init__(self, refresh_s: float = 1.0):
        self.refresh_s = refresh_s
        self.views: dict = {"status": {}, "devices": [], "rounds": []}
        self.as_of = 0.0
        self.last_read = 0.0                      # monotonic; written by the console's thread
        self._built = float("-inf")               # monotonic time of the last rebuild
        self._bytes_in: deque = deque(maxlen=64)  # (monotonic, uplink bytes so far)
        self._accepted: Counter = Counter()       # device -> accepted samples over the rounds counted so far
        self._rows_counted = 0
        self._predicted: dict = {}                # cost key -> predicted step seconds (or None)

    def read(self) -> dict:
        """The published views (the console's thread); marks the board as watched."""
        self.last_read = time.monotonic()
        return self.views

    def due(self) -> bool:
        now = time.monotonic()
        return now - self.last_read < WATCHED_S and now - self._built >= self.refresh_s

    def refresh(self, runtime, force: bool = False) -> None:
        """Rebuild and publish the views (serve thread). Never raises: a view that fails to build keeps the
        previous one (the console must not cost the run)."""
        if not force and not self.due():
            return
        self._built = time.monotonic()
        try:
            devices = self.device_rows(runtime)
            views = {"status": self.status(runtime, devices), "devices": devices,
                     "rounds": round_rows(runtime.strategy.rows)}
        except Exception:
            logger.exception("console views not rebuilt")
            return
        self.views, self.as_of = views, time.time()

    # -- views --------------------------------------------------------------------------------------

    def status(self, runtime, devices: list[dict]) -> dict:
        cfg, strategy, registry = runtime.cfg, runtime.strategy, runtime.registry
        rows = strategy.rows
        evaluated = [r for r in rows if r.get("test_accuracy") is not None]
        totals = {k: sum(d[f"bytes_{k}"] for d in devices) for k in ("up", "resent", "rejected", "down")}
        now = time.monotonic()
        self._bytes_in.append((now, totals["up"] + totals["resent"] + totals["rejected"]))
        while len(self._bytes_in) > 2 and now - self._bytes_in[1][0] >= RATE_WINDOW_S:
            self._bytes_in.popleft()
        (t0, b0), (t1, b1) = self._bytes_in[0], self._bytes_in[-1]
        return {
            "run": cfg.run_id, "algorithm": cfg.algorithm, "mode": cfg.mode, "strategy": strategy_name(cfg),
            "session": runtime.session, "started": runtime.started, "round": strategy.next_round,
            "rounds": cfg.rounds, "rounds_done": len(rows),
            "finished": strategy.next_round >= cfg.rounds and bool(rows),
            "test_accuracy": evaluated[-1]["test_accuracy"] if evaluated else None,
            "best_test_accuracy": max((r["test_accuracy"] for r in evaluated), default=None),
            "devices": {"registered": len(devices), "online": sum(d["online"] for d in devices),
                        "offline": sum(not d["online"] for d in devices),
                        "quarantined": sum(d["quarantined"] for d in devices)},
            "bytes": totals, "messages_in": runtime.messages_in, "rejections": dict(registry.rejections),
            "accepted_samples": sum(d["accepted_samples"] for d in devices),
            "ingest_bytes_per_s": (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0,
            "checkpoint": {"generation": runtime.store.generation, "error": runtime.checkpoint_error},
            "events_suppressed": runtime.telemetry.events_suppressed,
            "ingest_workers": ingest_workers(runtime),
        }

    def device_rows(self, runtime) -> list[dict]:
        """One row per registered device (the console's fleet table and ``/api/devices``)."""
        registry, rows = runtime.registry, runtime.strategy.rows
        if len(rows) < self._rows_counted:  # restored from an earlier checkpoint: count again
            self._accepted.clear()
            self._rows_counted = 0
        for row in rows[self._rows_counted:]:
            self._accepted.update(row.get("accepted_samples", {}))
        self._rows_counted = len(rows)
        out = []
        for name in registry.names():
            info = registry.devices[name]
            beat = info.get("heartbeat") or {}
            quarantined = registry.quarantined(name)
            up = info.get("bytes_up", 0)
            out.append({
                "device": name, "profile": info.get("profile"), "engine": info.get("engine"),
                "online": bool(info.get("online")), "last_heartbeat": info.get("last_heartbeat"),
                "registered_at": info.get("registered_at"), "offline_since": info.get("offline_since"),
                "step_time_s": _number(beat.get("step_time_s")), "peak_rss_mb": _number(beat.get("rss_mb")),
                "predicted_step_s": self.predicted_step(info, runtime.costs),
                "bytes_up": up, "bytes_down": info.get("bytes_down", 0), "bytes_resent": info.get("bytes_resent", 0),
                "bytes_rejected": info.get("bytes_rejected", 0),
                "compression": info.get("raw_fp32_bytes", 0) / up if up else None,
                "train_samples": info.get("train_samples"), "accepted_samples": self._accepted.get(name, 0),
                "rejected": info.get("rejected", 0), "rejection_reasons": dict(info.get("rejection_reasons", {})),
                "last_rejection": _printable_detail(info.get("last_rejection")), "quarantined": quarantined,
                "quarantined_until": info.get("quarantined_until") if quarantined else None,
                "quarantines": info.get("quarantines", 0), "quarantine_cause": _printable_detail(info.get("quarantine_cause")),
            })
        return out

    def predicted_step(self, info: dict, costs) -> float | None:
        """The profile's roofline estimate of one training step (``device_profiles``). The model's FLOPs are
        counted once per run recipe in ``costs`` (the report's :class:`~cloud_runtime.report.CostEstimator`
        cache, which the runtime computes anyway); per (recipe, profile, engine) only the profile is read and the
        estimate taken. The device's heartbeat is left out: its claims must not decide anyone's prediction."""
        key = (info.get("model"), info.get("batch_size"), str(info.get("input_shape")), str(info.get("model_kwargs")),
               info.get("optimizer"), info.get("profile"), info.get("engine"))
        if key in self._predicted:
            return self._predicted[key]
        facts = {k: v for k, v in info.items() if k != "heartbeat"}
        try:
            import torch

            from device_profiles.cost_report import device_cost  # torch, imported once
            with torch.random.fork_rng(devices=[]):  # building the model to count FLOPs draws weights: the run's
                cost = device_cost(facts, 0, costs.cache)  # random stream (shared with in-memory agents) is untouched
            predicted = cost["predicted_step_s"] if cost else None
        except Exception as e:  # an unknown profile name (a device's claim) or model: no prediction
            logger.debug("no step-time prediction for %s: %s", key, e)
            predicted = None
        if len(self._predicted) < PREDICTIONS_KEPT:  # beyond it (many odd profile names): computed each time
            self._predicted[key] = predicted
        return predicted


def ingest_workers(runtime) -> dict:
    """The ingest workers (``ingest.workers`` > 0): ``{"workers": N, "forwarded_transfers": n, "shards": {k:
    state}}``, state ``online`` | ``offline`` | ``stale`` (an online presence not renewed for 90 s) | ``misconfigured``
    | ``unknown`` (no presence seen yet)."""
    shards = getattr(runtime, "shards", None)
    return shards.view() if shards is not None else {"workers": 0, "forwarded_transfers": 0, "shards": {}}


def round_rows(rows: list[dict]) -> list[dict]:
    """Per round: accuracy, losses, time, participants, bytes, samples (``/api/rounds``, the curves)."""
    out = []
    for row in rows:
        server = row.get("server") if isinstance(row.get("server"), dict) else {}
        out.append({
            "round": row.get("round"), "test_accuracy": row.get("test_accuracy"), "test_loss": row.get("test_loss"),
            "mean_device_accuracy": row.get("mean_device_accuracy"), "server_loss": server.get("loss"),
            "server_train_accuracy": server.get("train_accuracy"), "seconds": row.get("seconds"),
            "upload_seconds": row.get("upload_seconds"), "participants": len(row.get("participants", [])),
            "bytes_up": sum((row.get("bytes_up") or {}).values()),
            "bytes_down": sum((row.get("bytes_down") or {}).values()),
            "accepted_samples": sum((row.get("accepted_samples") or {}).values()),
            "compression": row.get("upload_compression_ratio"),
        })
    return out


SORT_KEYS = ("device", "profile", "engine", "online", "last_heartbeat", "step_time_s", "peak_rss_mb",
             "predicted_step_s", "bytes_up", "bytes_down", "compression", "accepted_samples", "rejected", "quarantined")
STATES = ("all", "online", "offline", "quarantined")
MAX_PAGE = 1000


_DIGITS = re.compile(r"[0-9]{1,10}")


class QueryError(ValueError):
    """A query parameter of ``/api/devices`` that is not what it can be (the message names it)."""


def query_devices(rows: list[dict], params) -> dict:
    """Filter, sort and page the fleet table. ``params`` (a mapping of query strings): ``q`` (substring of the
    device, profile or engine), ``state`` (:data:`STATES`), ``sort`` (:data:`SORT_KEYS`), ``order``
    (``asc`` | ``desc``; missing values sort last either way), ``offset`` (>= 0), ``limit`` (1..1000, default
    50). Returns ``{"total", "matched", "offset", "limit", "sort", "order", "devices"}``. Raises QueryError."""
    state, sort, order = params.get("state", "all"), params.get("sort", "device"), params.get("order", "asc")
    if state not in STATES:
        raise QueryError(f"state must be one of {', '.join(STATES)}, got {state[:40]!r}")
    if sort not in SORT_KEYS:
        raise QueryError(f"sort must be one of {', '.join(SORT_KEYS)}, got {sort[:40]!r}")
    if order not in ("asc", "desc"):
        raise QueryError(f"order must be asc or desc, got {order[:40]!r}")
    offset, limit = _int_param(params, "offset", 0, 0, 10**9), _int_param(params, "limit", 50, 1, MAX_PAGE)
    needle = params.get("q", "")[:200].strip().lower()
    matched = [r for r in rows
               if (state == "all" or (state == "quarantined" and r["quarantined"])
                   or (state == "online" and r["online"]) or (state == "offline" and not r["online"]))
               and (not needle or any(needle in str(r[k] or "").lower() for k in ("device", "profile", "engine")))]
    present = sorted((r for r in matched if r[sort] is not None), key=lambda r: (r[sort], r["device"]),
                     reverse=order == "desc")
    ordered = present + [r for r in matched if r[sort] is None]
    return {"total": len(rows), "matched": len(matched), "offset": offset, "limit": limit, "sort": sort,
            "order": order, "devices": ordered[offset:offset + limit]}


def _int_param(params, name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not (isinstance(raw, str) and _DIGITS.fullmatch(raw) and low <= int(raw) <= high):  # ASCII digits only
        raise QueryError(f"{name} must be an integer in [{low}, {high}], got {str(raw)[:40]!r}")
    return int(raw)


def _number(value) -> float | None:
    """A finite, non-negative number a device reported (a time, a size), else None: heartbeats are the device's
    claim, and one device's -1000 or 1e308 must not move the fleet's figures."""
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    try:
        number = float(value)
    except OverflowError:  # an integer past float64
        return None
    return number if math.isfinite(number) and 0 <= number <= 1e12 else None


def _printable_detail(entry: dict | None) -> dict | None:
    """A rejection record with its detail (a sender's words) free of control and format characters."""
    if not isinstance(entry, dict):
        return None
    return {**entry, "detail": printable(str(entry.get("detail", "")))}
