"""FedGKT's server side: train the large model on uploaded features, answer with per-sample soft labels.

Transport-free. Uploads are held per device in their compact wire dtype (:class:`~cloud_runtime.features.
FeatureStore`), keyed by sample id; one round of server training mixes every device's samples (``epochs``
passes, CE + beta * KD to the client logits; batches dequantized as they are drawn), then returns a
:class:`SoftLabels` message per device with the server's logits for exactly the ids that device uploaded.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from cloud_runtime.config import ServerConfig
from cloud_runtime.distributed import plan_shards, server_device, state_for_ranks, train_shard
from cloud_runtime.features import FeatureStore, HeldUpload
from cloud_runtime.progress import Interrupted, ProgressLog, check as check_stop
from model_zoo.losses import gkt_loss
from model_zoo.optim import make_optimizer
from edge_sdk.messages import FeatureUpload, SoftLabels

logger = logging.getLogger(__name__)


@dataclass
class ServerRoundStats:
    loss: float
    ce: float
    kd: float
    train_accuracy: float
    samples: int
    seconds: float
    samples_per_s: float
    lr: float


@dataclass
class EvalResult:
    accuracy: float                      # pooled over every evaluated test sample
    loss: float
    samples: int
    per_device: dict[str, dict]          # device -> {accuracy, samples, edge_model_accuracy}

    @property
    def mean_device_accuracy(self) -> float:
        accs = [d["accuracy"] for d in self.per_device.values()]
        return float(np.mean(accs)) if accs else float("nan")


class GKTServer:
    def __init__(self, model: nn.Module, cfg: ServerConfig, num_classes: int, seed: int = 0,
                 spill_dir: str | None = None, group=None, model_spec: dict | None = None):
        """``group`` (a :class:`~cloud_runtime.distributed.TrainingGroup`, this process its coordinator): train
        with DistributedDataParallel across its ranks; ``model_spec`` ({name, num_classes, feature_channels,
        kwargs}) is how the ranks build the same model. Raises RuntimeError when ``server.device`` is cuda and
        no CUDA device is available."""
        self.group = group
        if group is not None and model_spec is None:
            raise ValueError("a training group needs the model's spec (the ranks build the model from it)")
        self.model_spec = model_spec
        self.device = server_device(cfg, group.launch.local_rank if group is not None else None)
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.cfg = cfg
        self.num_classes = num_classes
        self.optimizer = make_optimizer(self.model.parameters(), cfg, fused=True)  # one kernel, not a loop per tensor
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
        self._rng = np.random.default_rng(seed)
        self.autocast = cfg.precision == "bf16"
        if self.autocast:
            logger.info("server model: bf16 autocast on %s (server.precision: bf16; weights, optimizer, loss and soft "
                        "labels fp32)", self.device.type)
        if self.autocast and self.device.type == "cpu" and not cpu_has_native_bf16():
            logger.warning("server.precision bf16 on a CPU without native bf16 (avx512_bf16 / amx_bf16): emulated, "
                           "likely slower than fp32")
        self.train_store = FeatureStore(cfg.feature_memory_bytes, spill_dir)
        if self.train_store.remove_leftovers():  # an earlier process's spilled features: never read again
            logger.info("removed feature files an earlier runtime left in %s", spill_dir)
        self.feature_shape: tuple | None = None

    # -- checkpoint --------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def drop_device(self, device: str) -> None:
        self.train_store.drop(device)

    # -- ingest ----------------------------------------------------------------------------------

    def held(self, upload: HeldUpload | FeatureUpload) -> HeldUpload:
        """An upload in the held form (a torch :class:`FeatureUpload` is converted: tests, in-process use)."""
        return upload if isinstance(upload, HeldUpload) else HeldUpload.from_message(upload, self.cfg.feature_storage)

    def ingest(self, upload: HeldUpload | FeatureUpload) -> HeldUpload:
        """Validate and hold a device's training upload, by reference (the newest round replaces older ones);
        returns what is held (the same upload, or one whose features are memory-mapped: ``FeatureStore``).
        Raises MessageError (shapes, NaN/Inf) or ValueError (a test upload, an older round)."""
        upload = self.held(upload)
        upload.validate(self.num_classes, self.feature_shape)
        if upload.split != "train":
            raise ValueError(f"ingest takes training uploads; use evaluate() for {upload.split!r}")
        previous = self.train_store.get(upload.device_id)
        if previous is not None and upload.round < previous.round:
            raise ValueError(f"stale upload from {upload.device_id!r}: round {upload.round} < {previous.round}")
        if self.feature_shape is None:
            self.feature_shape = upload.features.shape[1:]
        return self.train_store.put(upload)

    # -- train -----------------------------------------------------------------------------------

    def _precision(self):
        """bf16 autocast of the forward when ``server.precision`` is bf16 (backward follows it); else nothing."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast)

    def _to_device(self, features: np.ndarray) -> torch.Tensor:
        batch = torch.from_numpy(features).to(self.device, non_blocking=True)
        return batch.contiguous(memory_format=torch.channels_last)

    def train_round(self, round_: int, progress=None, stop=None) -> tuple[dict[str, SoftLabels], ServerRoundStats]:
        """Train on every stored device's features; return soft labels per device and stats.

        Logs progress (:mod:`cloud_runtime.progress`); ``stop`` (an Event): raise :class:`~cloud_runtime.progress.
        Interrupted` between batches once it is set (the model is then part-trained: the caller discards it)."""
        if not self.train_store:
            raise RuntimeError("no training uploads to train on")
        if self.group is not None and len(self.train_store) >= self.group.world:
            return self._train_round_ranks(round_, progress, stop)
        if self.group is not None:  # fewer rows than ranks: no part for each; the coordinator trains them alone
            logger.warning("server round %d: %d samples for %d ranks: trained on the coordinator alone", round_,
                           len(self.train_store), self.group.world)
        store = self.train_store
        devices, offsets = store.layout()  # sorted devices, not arrival order: the same seed gives the same run
        n = int(offsets[-1])
        server_logits = torch.zeros(n, self.num_classes)
        use_kd = self.cfg.kd_beta > 0
        totals, seen, start = np.zeros(4), 0, time.perf_counter()
        epochs = self.cfg.epochs
        self.model.train()
        for epoch in range(epochs):
            last = epoch == epochs - 1
            totals[:] = 0
            seen = 0
            order = self._rng.permutation(n)
            label = f"server round {round_} epoch {epoch + 1}/{epochs}"
            meter = ProgressLog(logger, label, n, after=(epochs - epoch - 1) * n)
            for index in batches(order, self.cfg.batch_size):
                check_stop(stop, f"{label} at {seen:,}/{n:,} samples")
                features, teacher, labels = store.batch(index, devices, offsets)   # B x C x H x W, B x K, B
                with self._precision():
                    out = self.model(self._to_device(features)).float()
                batch_labels = torch.from_numpy(labels).to(self.device)
                loss, ce, kd = gkt_loss(out, batch_labels, torch.from_numpy(teacher).to(self.device) if use_kd else None,
                                        None, self.cfg.kd_beta, self.cfg.temperature)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if last and self.cfg.soft_labels == "last_epoch":
                    server_logits[torch.from_numpy(index)] = out.detach().float().cpu()
                b = len(index)
                totals += (float(loss.detach()) * b, float(ce) * b, float(kd) * b,
                           int((out.argmax(1) == batch_labels).sum()))
                seen += b
                meter.update(b, totals[0] / seen)  # the loss is already on the host (float() above)
                if progress is not None:
                    progress(b)
            meter.finish(totals[0] / max(seen, 1))
        return self._finish_round(round_, devices, offsets, server_logits, totals, seen, start, stop)

    def _train_round_ranks(self, round_: int, progress=None, stop=None):
        """:meth:`train_round` with DistributedDataParallel over the group's ranks (``cloud_runtime/distributed.
        py``): the same epoch orders and global batches as one process, each cut into one part per rank and
        sent one epoch at a time. A failure here leaves the ranks out of step: the group is marked broken (no
        more posts; closing it drops their connections) and the error propagates (a stop: Interrupted)."""
        group, store = self.group, self.train_store
        devices, offsets = store.layout()
        n = int(offsets[-1])
        orders = [self._rng.permutation(n) for _ in range(self.cfg.epochs)]  # the single-process draws
        start = time.perf_counter()
        server_logits = torch.zeros(n, self.num_classes)
        totals, seen = np.zeros(4), 0
        try:
            group.post({"op": "train", "round": round_, "epochs": self.cfg.epochs, "model": self.model_spec,
                        "state": state_for_ranks(self.model, self.optimizer)})
            model = group.wrap(self.model, self.device)
            for epoch, order in enumerate(orders):
                last = epoch == len(orders) - 1
                keep = last and self.cfg.soft_labels == "last_epoch"
                mine = group.scatter(plan_shards(store, batches(order, self.cfg.batch_size, min_last=group.world),
                                                 group.world))
                result = train_shard(model, self.optimizer, mine, self.cfg, self.device, self.autocast,
                                     self.num_classes, keep, stop,
                                     f"server round {round_} epoch {epoch + 1}/{len(orders)} ({group.world} ranks)",
                                     progress)
                results = group.gather(result)
                if any(r.stopped for r in results):
                    raise Interrupted(f"server round {round_} epoch {epoch + 1}: stopped")
                if last:
                    totals = np.sum([r.totals for r in results], axis=0)
                    seen = sum(r.samples for r in results)
                    if keep:
                        for r in results:
                            server_logits[torch.from_numpy(r.positions)] = torch.from_numpy(r.logits)
        except Interrupted:
            raise
        except Exception as e:
            group.broken = f"{type(e).__name__}: {e}"
            if stop is not None and stop.is_set():  # the ranks were stopped with us (torchrun's SIGTERM)
                raise Interrupted(f"server round {round_}: stopped ({group.broken})") from e
            raise
        return self._finish_round(round_, devices, offsets, server_logits, totals, seen, start, stop)

    def _finish_round(self, round_, devices, offsets, server_logits, totals, seen, start, stop):
        """Soft labels (the last epoch's logits, or one eval-mode pass), the LR schedule, stats and replies."""
        store, n = self.train_store, int(offsets[-1])
        if self.cfg.soft_labels == "eval_pass":
            meter = ProgressLog(logger, f"server round {round_} soft labels", n, quiet=True)
            server_logits = torch.cat([self._infer(store.get(d), meter=meter, stop=stop) for d in devices])
            meter.finish()
        seconds = time.perf_counter() - start
        loss, ce, kd, correct = totals / max(seen, 1)
        self.scheduler.step(loss)
        stats = ServerRoundStats(loss, ce, kd, correct, n * self.cfg.epochs, seconds,
                                 n * self.cfg.epochs / max(seconds, 1e-9), self.optimizer.param_groups[0]["lr"])
        replies = {}
        for p, device in enumerate(devices):
            rows = slice(int(offsets[p]), int(offsets[p + 1]))
            replies[device] = SoftLabels(device, round_, store.get(device).sample_ids, server_logits[rows].clone())
        return replies, stats

    @torch.inference_mode()
    def _infer(self, upload: HeldUpload, batch_size: int = 256, meter: ProgressLog | None = None,
               stop=None, before_batch=None) -> torch.Tensor:
        """The server's logits (float32 N x K) for every row of ``upload``, in eval mode, a batch at a time
        (``before_batch()``, when given, is called before each: e.g. to change the thread count)."""
        self.model.eval()
        out, n = [], len(upload.sample_ids)
        try:
            for i in range(0, n, batch_size):
                check_stop(stop, f"{meter.label if meter else 'inference'} at {i:,}/{n:,} samples")
                if before_batch is not None:
                    before_batch()
                rows = slice(i, min(i + batch_size, n))
                with self._precision():
                    out.append(self.model(self._to_device(upload.features.rows(rows))).float().cpu())
                if meter is not None:
                    meter.update(len(out[-1]))
        finally:
            self.model.train()
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    # -- evaluate --------------------------------------------------------------------------------

    @torch.inference_mode()
    def evaluate(self, uploads: list[HeldUpload | FeatureUpload], round_: int | None = None, stop=None,
                 before_batch=None) -> EvalResult:
        """Accuracy of (device extractor -> server model) on each device's test features. Logs progress when
        it takes longer than :data:`~cloud_runtime.progress.QUIET_S`; ``stop``: as in :meth:`train_round`;
        ``before_batch``: as in :meth:`_infer`."""
        uploads = [self.held(u) for u in uploads]
        per_device, correct_total, loss_total, n_total = {}, 0, 0.0, 0
        label = "server evaluation" if round_ is None else f"server round {round_} evaluation"
        meter = ProgressLog(logger, label, sum(len(u.labels) for u in uploads), quiet=True)
        for upload in uploads:
            upload.validate(self.num_classes, self.feature_shape)
            logits = self._infer(upload, meter=meter, stop=stop, before_batch=before_batch)
            labels = torch.from_numpy(upload.labels)
            correct = int((logits.argmax(1) == labels).sum())
            loss_total += float(nn.functional.cross_entropy(logits, labels, reduction="sum"))
            n = len(upload.labels)
            edge_correct = int((upload.logits.argmax(1) == upload.labels).sum())
            per_device[upload.device_id] = {"accuracy": correct / max(n, 1), "samples": n,
                                            "edge_model_accuracy": edge_correct / max(n, 1)}
            correct_total += correct
            n_total += n
        meter.finish(loss_total / max(n_total, 1))
        return EvalResult(correct_total / max(n_total, 1), loss_total / max(n_total, 1), n_total, per_device)


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def batches(order: np.ndarray, batch_size: int, min_last: int = 1) -> list[np.ndarray]:
    """``order`` cut into batches of ``batch_size``; a last batch of fewer than ``max(2, min_last)`` samples
    joins the one before it (BatchNorm cannot train on a single sample of 1x1 features; ``min_last``: the
    ranks of a distributed round, each of which needs a row)."""
    out = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if len(out) > 1 and len(out[-1]) < max(2, min_last):
        out[-2:] = [np.concatenate(out[-2:])]
    return out
