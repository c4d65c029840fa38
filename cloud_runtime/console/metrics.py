"""``/metrics``: the run in Prometheus' text exposition format, through ``prometheus_client``.

Two sources, one page:

- the counters the serve thread increments as things happen (:class:`~cloud_runtime.telemetry.RuntimeCounters`:
  messages, uplink/downlink bytes, rejections by reason, quarantines, rounds, accepted samples). With
  ``PROMETHEUS_MULTIPROC_DIR`` set they are read from the library's multiprocess files
  (``MultiProcessCollector``), so processes that ingest side by side add up;
- gauges of the run's state, from the console's published views (:class:`FleetCollector`): round,
  accuracy, devices by state, ingest rate, and per-device series (step time measured and predicted,
  peak memory, bytes, accepted samples, rejections) for at most ``max_device_series`` devices; the
  rest are aggregated in one series with an empty ``device`` label (no device id is empty, so no device
  can pass itself off as the aggregate): a sum for counts and bytes, the mean step time, the largest peak
  memory. The number of series stays bounded whatever the fleet size.
"""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector

from cloud_runtime.console.views import StatusBoard
from cloud_runtime.telemetry import Telemetry, multiprocess_dir

WORKER_STATES = ("online", "offline", "stale", "misconfigured", "unknown")
OTHER = ""   # the device label of the aggregate of the devices past max_device_series (no device id is empty)


class FleetCollector:
    """A custom collector (``prometheus_client``'s ``collect()`` protocol) over a :class:`StatusBoard`."""

    def __init__(self, board: StatusBoard, telemetry: Telemetry, max_device_series: int):
        self.board, self.telemetry, self.max_devices = board, telemetry, max_device_series

    def describe(self):
        return []  # names vary with the fleet: nothing to check for duplicates at registration

    def collect(self):
        views = self.board.read()
        status, devices = views["status"], views["devices"]
        if not status:
            return
        info = InfoMetricFamily("edgefl_run", "The run this runtime serves")
        info.add_metric([], {k: str(status[k]) for k in ("run", "algorithm", "mode", "strategy", "session")})
        yield info
        for name, doc, value in (
                ("edgefl_round", "The round in progress (async: the next server update)", status["round"]),
                ("edgefl_rounds_planned", "Rounds the run is configured for", status["rounds"]),
                ("edgefl_test_accuracy", "Test accuracy of the last evaluated round (ratio)", status["test_accuracy"]),
                ("edgefl_best_test_accuracy", "Best test accuracy so far (ratio)", status["best_test_accuracy"]),
                ("edgefl_ingest_bytes_per_second", "Uplink bytes received per second, over the last ~10 s",
                 status["ingest_bytes_per_s"]),
                ("edgefl_status_age_seconds", "Age of the state these gauges show (grows while the runtime "
                 "computes)", time.time() - self.board.as_of),
                ("edgefl_phase_progress_ratio", "Progress of the server's current compute (0-1)",
                 _progress(self.telemetry.phase))):
            if value is not None:
                yield GaugeMetricFamily(name, doc, value=value)
        by_state = GaugeMetricFamily("edgefl_devices", "Registered devices by state", labels=["state"])
        for state in ("online", "offline", "quarantined"):
            by_state.add_metric([state], status["devices"][state])
        yield by_state
        workers = status.get("ingest_workers") or {}
        if workers.get("workers"):
            shards = GaugeMetricFamily("edgefl_ingest_workers", "Ingest workers (shards) by the state of their "
                                       "presence", labels=["state"])
            states = list(workers["shards"].values())
            for state in WORKER_STATES:
                shards.add_metric([state], states.count(state))
            yield shards
            yield CounterMetricFamily("edgefl_ingest_forwarded_transfers", "Transfers the ingest workers forwarded "
                                      "to this runtime", value=workers["forwarded_transfers"])
        yield from self.per_device(devices)

    def per_device(self, devices: list[dict]):
        shown, rest = devices[:self.max_devices], devices[self.max_devices:]
        families = {
            "online": GaugeMetricFamily("edgefl_device_online", "1 while the device is online", labels=["device"]),
            "step": GaugeMetricFamily("edgefl_device_step_seconds", "Measured training step time (the device's "
                                      "median)", labels=["device"]),
            "predicted": GaugeMetricFamily("edgefl_device_predicted_step_seconds", "Training step time its profile "
                                           "predicts (roofline)", labels=["device"]),
            "rss": GaugeMetricFamily("edgefl_device_peak_rss_bytes", "Peak resident memory of the device's process",
                                     labels=["device"]),
            "quarantined": GaugeMetricFamily("edgefl_device_quarantined", "1 while the device is quarantined",
                                             labels=["device"]),
            "up": CounterMetricFamily("edgefl_device_uplink_bytes", "Wire bytes of the device's accepted transfers",
                                      labels=["device"]),
            "samples": CounterMetricFamily("edgefl_device_accepted_samples", "Training samples of the device the "
                                           "completed rounds trained on", labels=["device"]),
            "rejected": CounterMetricFamily("edgefl_device_rejected_messages", "Messages of the device rejected",
                                            labels=["device"]),
        }
        for d in shown:
            self._add(families, d["device"], d)
        if rest:
            steps = [d["step_time_s"] for d in rest if d["step_time_s"] is not None]
            predicted = [d["predicted_step_s"] for d in rest if d["predicted_step_s"] is not None]
            rss = [d["peak_rss_mb"] for d in rest if d["peak_rss_mb"] is not None]
            self._add(families, OTHER, {
                "online": sum(d["online"] for d in rest), "quarantined": sum(d["quarantined"] for d in rest),
                "step_time_s": sum(steps) / len(steps) if steps else None,
                "predicted_step_s": sum(predicted) / len(predicted) if predicted else None,
                "peak_rss_mb": max(rss) if rss else None, "bytes_up": sum(d["bytes_up"] for d in rest),
                "accepted_samples": sum(d["accepted_samples"] for d in rest),
                "rejected": sum(d["rejected"] for d in rest)})
        yield from families.values()
        yield GaugeMetricFamily("edgefl_device_series_aggregated", "Devices aggregated in the series with an empty "
                                "device label (past console.max_device_series)", value=len(rest))

    @staticmethod
    def _add(families: dict, device: str, d: dict) -> None:
        families["online"].add_metric([device], float(d["online"]))
        families["quarantined"].add_metric([device], float(d["quarantined"]))
        for key, field, scale in (("step", "step_time_s", 1.0), ("predicted", "predicted_step_s", 1.0),
                                  ("rss", "peak_rss_mb", 2.0 ** 20)):  # the device reports MiB (VmHWM / 1024)
            if d[field] is not None:
                families[key].add_metric([device], d[field] * scale)
        families["up"].add_metric([device], d["bytes_up"])
        families["samples"].add_metric([device], d["accepted_samples"])
        families["rejected"].add_metric([device], d["rejected"])


def _progress(phase: dict) -> float | None:
    total = phase.get("total") or 0
    return min(1.0, phase.get("done", 0) / total) if total else None


def metrics_registry(board: StatusBoard, telemetry: Telemetry, max_device_series: int) -> CollectorRegistry:
    """What ``/metrics`` exposes: the counters (this process's, or every process's in multiprocess mode) and
    the fleet gauges."""
    path = multiprocess_dir()
    if path:
        registry = CollectorRegistry()
        MultiProcessCollector(registry, path=path)
    else:
        registry = telemetry.counters.registry
    registry.register(FleetCollector(board, telemetry, max_device_series))
    return registry
