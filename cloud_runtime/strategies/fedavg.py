"""FedAvg (McMahan et al. 2017) with robust aggregation: devices train the whole model, the runtime
clips updates longer than ``clip_multiplier`` x the round's median norm, aggregates them with
``fedavg.aggregator`` (a pure function from :data:`cloud_runtime.aggregation.AGGREGATORS`), evaluates
the global model on held-out data and records layer-wise client divergence."""
from __future__ import annotations

import logging
import time

import numpy as np
import torch

from cloud_runtime import aggregation as A
from cloud_runtime.progress import ProgressLog, check as check_stop
from cloud_runtime.registry import Rejected
from cloud_runtime.strategies.base import STRATEGIES, Strategy, check_batch_norm
from edge_sdk import protocol as P
from edgefl_core.data.datasets import dataset_stats
from model_zoo import create_model

logger = logging.getLogger("edgefl.runtime")


@STRATEGIES.register("fedavg")
class FedAvg(Strategy):
    uplink_kind = P.KIND_MODEL_UPDATE

    def __init__(self, ctx):
        super().__init__(ctx)
        self.global_model: torch.nn.Module | None = None
        self._update_limit: int | None = None   # what a model update may decompress to, once the model exists
        self.model_updates: dict[str, tuple[dict, int, dict]] = {}  # device -> (state, samples, metrics)
        self._eval_set = None
        self._said_not_robust: set[tuple[str, int]] = set()  # (aggregator, updates) already warned of

    def build(self) -> None:
        """The global model is the run's ``edge.model`` (the runtime's recipe) for the run's input channels."""
        shape = self.input_shape or [3, 32, 32]
        edge = self.cfg.edge
        self.global_model = create_model(edge.model, num_classes=self.num_classes, in_channels=int(shape[0]),
                                         **edge.model_kwargs)
        state = self.ctx.store.load_model("global_model")
        if state is not None:
            self.global_model.load_state_dict(state)
            logger.info("global model restored from %s", self.ctx.store.files["global_model"])
        logger.info("global model %s: %d parameters", edge.model,
                    sum(p.numel() for p in self.global_model.parameters()))
        # the model's size, twice over at most (fp32 of what may be fp16 now)
        self._update_limit = sum(v.numel() * v.element_size() for v in self.global_model.state_dict().values()) * 2 \
            + 65536

    def models(self) -> dict[str, torch.nn.Module]:
        return {"global_model": self.global_model} if self.global_model is not None else {}

    def decoded_limit(self, device: str, meta: dict) -> int | None:
        """A model update: the global model's size, twice over at most (fp32 of what may be fp16 now)."""
        return self._update_limit

    def take(self, device: str, done: P.CompletedTransfer) -> str:
        assert self.global_model is not None
        reference = self.global_model.state_dict()
        state = P.arrays_to_state(P.unpack_arrays(done.blob, self._update_limit, done.packed), reference)
        samples = done.meta.get("samples")
        registered = self.ctx.registry.devices[device].get("train_samples")
        if type(samples) is not int or samples <= 0 or samples != registered:
            raise Rejected("bad_payload", f"model update with samples={str(samples)[:40]}, the device registered "
                                          f"{registered} training samples")
        floats = [k for k, v in state.items() if v.is_floating_point()]
        norm = A.update_norm({k: state[k].numpy() for k in floats}, {k: reference[k].numpy() for k in floats})
        if norm > self.cfg.validation.max_update_norm:
            raise Rejected("implausible_values", f"model update norm {norm:.3g} > {self.cfg.validation.max_update_norm:g}")
        check_batch_norm(state, "model update")
        metrics = done.meta.get("metrics") or {}
        replaced = device in self.model_updates
        self.model_updates[device] = (state, samples, dict(metrics) if isinstance(metrics, dict) else {})
        self.ctx.ingest.count_accepted(device, done, replaced)
        return f"model update of round {done.round} accepted: {samples} samples, {done.wire_bytes / 1e6:.2f} MB"

    def aggregate(self) -> dict:
        """Robust aggregation of this round's updates into the global model; returns the row's diagnostics."""
        assert self.global_model is not None
        self.use_threads()
        devices = sorted(self.model_updates)
        reference = {k: v.numpy() for k, v in self.global_model.state_dict().items()}
        states = [{k: v.numpy() for k, v in self.model_updates[d][0].items()} for d in devices]
        weights = [self.model_updates[d][1] for d in devices]
        floats = [k for k, v in reference.items() if np.issubdtype(v.dtype, np.floating)]
        float_ref = {k: reference[k] for k in floats}
        fa = self.cfg.fedavg
        clipped, norms, bound = A.clip_to_median([{k: s[k] for k in floats} for s in states], float_ref,
                                                 fa.clip_multiplier or 1.0)
        if fa.clip_multiplier is not None and len(states) > 1:
            states = [{**s, **c} for s, c in zip(states, clipped)]
        else:
            bound = None
        tolerated = A.tolerated_outliers(fa.aggregator, len(states), fa.trim_fraction)
        if fa.aggregator != "fedavg" and not tolerated and (fa.aggregator, len(states)) not in self._said_not_robust:
            self._said_not_robust.add((fa.aggregator, len(states)))  # said once per count, not every round
            need = A.updates_to_tolerate_one(fa.aggregator, fa.trim_fraction)
            logger.warning("fedavg.aggregator %s over %d updates tolerates no outlier: it is their mean (%s)",
                           fa.aggregator, len(states), f"it needs {need} or more" if need else "trim_fraction is 0")
        new = A.AGGREGATORS.get(fa.aggregator)(states, weights, {"trim_fraction": fa.trim_fraction})
        divergence = A.layer_divergence([{k: s[k] for k in floats} for s in states], {k: new[k] for k in floats})
        self.global_model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in new.items()})
        return {"update_norms": dict(zip(devices, norms)), "clip_bound": bound,
                "clipped": [d for d, n in zip(devices, norms) if bound is not None and n > bound],
                "divergence": divergence, "weights": dict(zip(devices, weights)), "tolerated_outliers": tolerated}

    @torch.inference_mode()
    def evaluate(self, row: dict) -> None:
        """The global model on ``eval_data`` (the runtime's held-out set)."""
        if self.cfg.eval_data is None or self.global_model is None:
            row["test_accuracy"] = None
            return
        from edge_sdk.data.batching import ArrayLoader
        from edgefl_core.data.local import load_local_data
        self.use_threads()
        if self._eval_set is None:
            _, self._eval_set = load_local_data(self.cfg.eval_data)
        stats = self.cfg.eval_data.dataset if dataset_stats(self.cfg.eval_data.dataset) else None
        model = self.global_model.eval()
        correct = loss = 0.0
        n = len(self._eval_set)
        label = f"round {row.get('round')} evaluation of the global model"
        meter = ProgressLog(logger, label, n, quiet=True)  # a line only when it takes more than a few seconds
        for batch in ArrayLoader(self._eval_set, 500, stats_name=stats, channels_last=False):
            check_stop(self.ctx.stop, f"{label} at {meter.done:,}/{n:,} samples")
            logits = model(batch.images)
            correct += int((logits.argmax(1) == batch.labels).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
            meter.update(len(batch.labels), loss / max(meter.done + len(batch.labels), 1))
        meter.finish(loss / max(n, 1))
        row.update(test_accuracy=correct / n, test_loss=loss / n, test_samples=n)

    def run(self) -> None:
        ctx = self.ctx
        for round_ in range(self.next_round, self.cfg.rounds):
            if ctx.stop.is_set():
                return
            self.model_updates.clear()
            ctx.ingest.new_round()
            start = time.monotonic()
            ctx.downlink.broadcast(P.ROUND, round_, session=ctx.downlink.session, eval=False,
                                   deadline_s=self.cfg.round_deadline_s, soft_labels_round=None, soft_labels_to=[],
                                   soft_labels_wait_s=self.cfg.soft_labels_wait_s,
                                   average_extractors=self.cfg.fedgkt.average_extractors)
            assert self.global_model is not None
            arrays, meta = P.state_to_arrays(self.global_model.state_dict(), self.cfg.fedavg.model_codec)
            meta["kind"] = P.KIND_MODEL
            ctx.downlink.send_arrays(ctx.registry.names(), arrays, round_, meta)
            logger.info("round %d open: global model sent to %d devices", round_, len(ctx.registry.devices))
            self.phase("devices training", round_)
            if not self.collect(round_, lambda: set(self.model_updates)):
                return
            self.phase("aggregating", round_)
            row: dict = {"round": round_, "participants": sorted(self.model_updates),
                         "upload_seconds": time.monotonic() - start, **self.aggregate()}
            self.phase("evaluating", round_)
            self.evaluate(row)
            row["edge"] = {d: self.model_updates[d][2] for d in row["participants"]}
            row["accepted_samples"] = {d: self.model_updates[d][1] for d in row["participants"]}
            self.finish_row(row, start)
            self.next_round = round_ + 1
            ctx.checkpoint()
