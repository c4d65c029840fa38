"""The strategy interface: one class per algorithm, in the spirit of Flower's ``Strategy``.

A strategy configures each round (what it announces to devices), accepts what devices send
(:meth:`Strategy.accept`), trains or aggregates on what it collected, evaluates, and keeps the rows of
the report. It never touches the transport: it talks to devices through :class:`Downlink` and waits on
the runtime's inbox through ``ctx.pump``. Register one with ``@STRATEGIES.register("name")``.
"""
from __future__ import annotations

import logging
import math
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import torch

from cloud_runtime.config import RuntimeConfig
from cloud_runtime.downlink import Downlink
from cloud_runtime.ingest import Ingest
from cloud_runtime.registry import DeviceRegistry, Rejected
from cloud_runtime.store import DurableStore
from edge_sdk import protocol as P
from edgefl_core.registry import Registry
from model_zoo import seeded

logger = logging.getLogger("edgefl.runtime")

STRATEGIES: Registry[type["Strategy"]] = Registry("strategy")


def strategy_name(cfg: RuntimeConfig) -> str:
    """``fedavg``, ``fedgkt_sync`` or ``fedgkt_async`` from ``algorithm`` and ``mode``."""
    return cfg.algorithm if cfg.algorithm == "fedavg" else f"{cfg.algorithm}_{cfg.mode}"


def check_batch_norm(state: dict[str, torch.Tensor], what: str) -> None:
    """A device's model state may be averaged into what every device loads: its BatchNorm running variances
    (``*running_var``) must be >= 0, or the average can be negative and every device that loads it computes
    the square root of a negative number in eval mode (NaN features, each honest upload then rejected as
    ``non_finite``, the round stalled). Raises Rejected("implausible_values") naming the tensor."""
    for name, value in state.items():
        if name.endswith("running_var") and value.numel() and float(value.min()) < 0:
            raise Rejected("implausible_values", f"{what}: {name[:80]} holds a negative variance "
                                                 f"({float(value.min()):.3g})")


@dataclass
class RunContext:
    """What a strategy may use: the run's config and the runtime's components."""

    cfg: RuntimeConfig
    registry: DeviceRegistry
    ingest: Ingest
    downlink: Downlink
    store: DurableStore
    stop: threading.Event
    pump: Callable[[], float]          # handle queued messages (waits briefly for the first); returns the
    #                                    time.monotonic() up to which every message that arrived is handled
    checkpoint: Callable[[], None]     # commit durable state (after every round)
    threads: int = 1                   # torch intra-op threads for the cloud's own compute
    group: object = None               # a torchrun launch's TrainingGroup (cloud_runtime/distributed.py), or None


class Strategy(ABC):
    uplink_kind = P.KIND_UPLOAD   # the transfer kind devices send in this algorithm

    def __init__(self, ctx: RunContext):
        self.ctx = ctx
        self.cfg = ctx.cfg
        self.rows: list[dict] = []
        self.next_round = 0
        self.num_classes: int | None = None      # run facts: fixed by setup()
        self.input_shape: list[int] | None = None
        self.feature_channels: int | None = None

    # -- run facts and devices ----------------------------------------------------------------------

    def setup(self, num_classes: int, input_shape: list[int] | None, feature_channels: int) -> None:
        """Fix the run's facts (classes, C x H x W, feature channels) and build the models (restoring committed
        ones). ``feature_channels`` is what the first registration said; a strategy that can derive it from
        the run's own edge model does (:meth:`build`)."""
        self.num_classes, self.input_shape, self.feature_channels = num_classes, input_shape, feature_channels
        try:
            with seeded(self.cfg.seed):  # every restart rebuilds the same initial models
                self.build()
        except Exception:  # nothing is fixed until the models exist
            self.num_classes = self.input_shape = self.feature_channels = None
            raise

    @abstractmethod
    def build(self) -> None: ...

    def run_feature_channels(self, num_classes: int, input_shape: list[int]) -> int | None:
        """The feature channels the run's own edge model gives (None: the strategy does not use features)."""
        return None

    def on_register(self, device: str) -> None:
        """A device (re-)registered."""

    def expected_round(self, device: str) -> int:
        return self.next_round

    def accept(self, device: str, done: P.CompletedTransfer) -> str:
        """Check a completed uplink transfer and take it; returns a log line. Raises Rejected (no side effect)."""
        kind = done.meta.get("kind")
        if kind != self.uplink_kind:
            raise Rejected("bad_type", f"transfer kind {kind!r} on an uplink of a {self.cfg.algorithm} run")
        expected = self.expected_round(device)
        if done.round != expected:
            raise Rejected("stale_round" if done.round < expected else "future_round",
                           f"upload for round {done.round}, expected {expected}")
        return self.take(device, done)

    @abstractmethod
    def take(self, device: str, done: P.CompletedTransfer) -> str: ...

    def decoded_limit(self, device: str, meta: dict) -> int | None:
        """Bytes a transfer of ``device`` whose first chunk states ``meta`` may decompress to: checked before a
        forward of it decompressed by an ingest worker is held, and told to that worker (it decompresses no
        more). None: not known yet (the run's shapes are not), and the runtime's ``max_decoded_bytes`` bounds
        it."""
        return None

    @abstractmethod
    def run(self) -> None:
        """Run rounds from ``next_round`` to ``cfg.rounds`` (returns early when ``ctx.stop`` is set)."""

    def close(self) -> None:
        """The runtime is done with this strategy: release what it holds outside the checkpoint."""

    # -- durable state ------------------------------------------------------------------------------

    def models(self) -> dict[str, torch.nn.Module]:
        """Key -> module with ``state_dict()`` to checkpoint."""
        return {}

    def parameter_count(self) -> int | None:
        """Trainable parameters of the cloud's model (the server model, or FedAvg's global model)."""
        models = list(self.models().values())
        modules = [getattr(m, "model", m) for m in models]  # GKTServer checkpoints its optimizer too
        return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad) if models else None

    def snapshot(self) -> dict:
        return {"next_round": self.next_round, "rows": self.rows, "num_classes": self.num_classes,
                "input_shape": self.input_shape, "feature_channels": self.feature_channels}

    def restore(self, state: dict) -> None:
        self.next_round = int(state.get("next_round", 0))
        self.rows = state.get("rows", [])
        if state.get("num_classes"):
            self.setup(int(state["num_classes"]), state.get("input_shape"), int(state["feature_channels"]))

    # -- helpers for round loops --------------------------------------------------------------------

    def phase(self, name: str, round_: int | None = None, total: int = 0) -> None:
        """What the run is doing now, for the operator's console (``cloud_runtime/telemetry.py``)."""
        self.ctx.registry.telemetry.set_phase(name, round_, total)

    def use_threads(self) -> None:
        """Set torch's threads for the cloud's compute phase. One process has one torch thread pool: when
        agents share it (``--transport memory``) each side sets its own count before it computes."""
        if torch.get_num_threads() != self.ctx.threads:
            torch.set_num_threads(self.ctx.threads)

    def collect(self, round_: int, done: Callable[[], set]) -> bool:
        """Serve until every reachable device is ``done()``, or the deadline passes with a quorum of them.

        Returns False when asked to stop."""
        start, warned = time.monotonic(), False
        registry = self.ctx.registry
        while not self.ctx.stop.is_set():
            handled_to = self.ctx.pump()
            finished = done()
            waiting_for = registry.reachable()
            if waiting_for and all(d in finished for d in waiting_for):
                return True
            need = max(1, math.ceil(self.cfg.quorum * len(registry.in_good_standing())))
            # the deadline passes once everything that arrived before it is judged: an upload still queued
            # behind a backlog came in time
            if handled_to - start >= self.cfg.round_deadline_s:
                if len(finished) >= need:
                    missing = sorted(set(registry.names()) - finished)
                    logger.warning("round %d deadline: closing with %d/%d devices (missing %s)", round_,
                                   len(finished), len(registry.devices), ", ".join(missing))
                    registry.telemetry.event("deadline", None, f"round {round_} closed at its deadline with "
                                             f"{len(finished)}/{len(registry.devices)} devices")
                    return True
                if not warned:
                    logger.warning("round %d deadline passed with %d uploads, quorum needs %d: waiting", round_,
                                   len(finished), need)
                    registry.telemetry.event("deadline", None, f"round {round_} deadline passed with "
                                             f"{len(finished)} uploads, quorum needs {need}: waiting")
                    warned = True
        return False

    def finish_row(self, row: dict, start: float) -> None:
        """Complete a round's report row (time, bytes, rejections) and keep it. ``bytes_up`` is what the round's
        accepted transfers took on the wire; re-sent and rejected bytes are reported beside it (``ingest.py``)."""
        ingest = self.ctx.ingest
        up = dict(ingest.round_bytes["up"])
        raw = sum(ingest.round_raw.values())
        row.update(seconds=time.monotonic() - start, bytes_up=up, bytes_resent=dict(ingest.round_bytes["resent"]),
                   bytes_rejected=dict(ingest.round_bytes["rejected"]), bytes_down=dict(ingest.round_bytes["down"]),
                   upload_compression_ratio=raw / max(sum(up.values()), 1),
                   rejections=dict(self.ctx.registry.rejections))
        self.rows.append(row)
        acc = row.get("test_accuracy")
        telemetry = self.ctx.registry.telemetry
        telemetry.counters.rounds.inc()
        telemetry.counters.accepted_samples.inc(sum(row.get("accepted_samples", {}).values()))
        telemetry.event("round", None, f"round {row['round']} done in {row['seconds']:.1f} s" +
                        (f", test accuracy {acc:.4f}" if acc is not None else ""))
        extra = {k: sum(row[f"bytes_{k}"].values()) for k in ("resent", "rejected")}
        logger.info("round %d done in %.1fs: %s, upload %.1f MB (%.1fx smaller than fp32)%s", row["round"],
                    row["seconds"], f"test accuracy {acc:.4f}" if acc is not None else
                    "evaluating while devices train the next round" if row.get("evaluation") else "no eval",
                    sum(up.values()) / 1e6, row["upload_compression_ratio"],
                    "".join(f", {v / 1e6:.2f} MB {k}" for k, v in extra.items() if v))
