"""``report.json``: the run, every round's row, final figures and per-device facts (README: report.json)."""
from __future__ import annotations

import logging
import time

from cloud_runtime.registry import DeviceRegistry

logger = logging.getLogger("edgefl.runtime")


class CostEstimator:
    """Predicted vs measured step time, FLOPs spent and bytes moved per device (cached per model shape)."""

    def __init__(self):
        self.cache: dict = {}   # model costs by (model, batch, shape, options, optimizer): FLOP counting, once

    def __call__(self, info: dict, rounds_done: int) -> dict | None:
        from device_profiles.cost_report import device_cost  # torch + FlopCounterMode: only when reporting
        try:
            return device_cost(info, rounds_done, self.cache)
        except Exception as e:  # a profile we cannot evaluate must not break the report
            logger.warning("no cost estimate for %s: %s", info.get("model"), e)
            return None


def build_report(run: dict, rows: list[dict], registry: DeviceRegistry, messages_in: int, started: float,
                 cost: CostEstimator) -> dict:
    evaluated = [r for r in rows if r.get("test_accuracy") is not None]
    devices = registry.devices
    up = sum(d["bytes_up"] for d in devices.values())  # accepted transfers only (cloud_runtime/ingest.py)
    raw = sum(d["raw_fp32_bytes"] for d in devices.values())
    final: dict = {}
    if evaluated:
        last = evaluated[-1]
        final = {"test_accuracy": last["test_accuracy"], "mean_device_accuracy": last.get("mean_device_accuracy"),
                 "best_test_accuracy": max(r["test_accuracy"] for r in evaluated),
                 "test_samples": last.get("test_samples")}
    final.update(rounds=len(rows), bytes_up=up, bytes_resent=sum(d.get("bytes_resent", 0) for d in devices.values()),
                 bytes_rejected=sum(d.get("bytes_rejected", 0) for d in devices.values()),
                 bytes_down=sum(d["bytes_down"] for d in devices.values()),
                 upload_compression_ratio=raw / max(up, 1), rejections=dict(registry.rejections),
                 messages_in=messages_in,
                 accepted_samples=sum(sum(r.get("accepted_samples", {}).values()) for r in rows),
                 quarantined=sorted(d for d, info in devices.items() if info.get("quarantines")),
                 total_seconds=time.time() - started)
    per_device = {}
    for name, info in devices.items():
        entry = per_device[name] = {k: v for k, v in info.items() if k not in ("rounds", "feature_releases")}
        if "feature_releases" in info:
            entry["feature_releases"] = len(info["feature_releases"])  # distinct training-feature payloads seen
        entry["cost"] = cost(info, sum(name in r.get("participants", []) for r in rows))
        last = (evaluated[-1].get("per_device") or {}).get(name) if evaluated else None
        if last:
            entry.update(final_test_accuracy=last["accuracy"], final_edge_model_accuracy=last.get("edge_model_accuracy"))
    return {"run": run, "rounds": rows, "final": final, "devices": per_device}
