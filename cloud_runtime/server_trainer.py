"""FedGKT's server side: train the large model on uploaded features, answer with per-sample soft labels.

Transport-free. Uploads are validated and stored per device, keyed by sample id; one round of
server training mixes every device's samples (``epochs`` passes, CE + beta * KD to the client
logits), then returns a :class:`SoftLabels` message per device with the server's logits for exactly
the ids that device uploaded.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from cloud_runtime.config import ServerConfig
from cloud_runtime.progress import ProgressLog, check as check_stop
from model_zoo.losses import gkt_loss
from model_zoo.optim import make_optimizer
from edge_sdk.messages import FeatureUpload, SoftLabels

logger = logging.getLogger(__name__)


@dataclass
class DeviceFeatures:
    """One device's latest accepted upload for a split."""

    round: int
    sample_ids: np.ndarray
    features: torch.Tensor   # stored dtype (float16 or float32)
    client_logits: torch.Tensor
    labels: torch.Tensor


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
    def __init__(self, model: nn.Module, cfg: ServerConfig, num_classes: int, seed: int = 0):
        wants_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
        if cfg.device == "cuda" and not torch.cuda.is_available():
            raise RuntimeError("server.device is cuda but no CUDA device is available")
        self.device = torch.device("cuda" if wants_cuda else "cpu")
        self.model = model.to(self.device, memory_format=torch.channels_last)
        self.cfg = cfg
        self.num_classes = num_classes
        self.optimizer = make_optimizer(self.model.parameters(), cfg)
        self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, mode="min", factor=cfg.plateau_factor, patience=cfg.plateau_patience)
        self._storage_dtype = torch.float16 if cfg.feature_storage == "float16" else torch.float32
        self._rng = np.random.default_rng(seed)
        self.train_store: dict[str, DeviceFeatures] = {}
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
        self.train_store.pop(device, None)

    # -- ingest ----------------------------------------------------------------------------------

    def ingest(self, upload: FeatureUpload) -> None:
        """Validate and store a device's training upload (the newest round replaces older ones)."""
        upload.validate(self.num_classes, self.feature_shape)
        if upload.split != "train":
            raise ValueError(f"ingest takes training uploads; use evaluate() for {upload.split!r}")
        previous = self.train_store.get(upload.device_id)
        if previous is not None and upload.round < previous.round:
            raise ValueError(f"stale upload from {upload.device_id!r}: round {upload.round} < {previous.round}")
        if self.feature_shape is None:
            self.feature_shape = tuple(upload.features.shape[1:])
        self.train_store[upload.device_id] = DeviceFeatures(
            upload.round, upload.sample_ids, upload.features.to(self._storage_dtype),
            upload.logits.float(), upload.labels)

    # -- train -----------------------------------------------------------------------------------

    def _gather(self, features: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        batch = features[index].to(self.device, non_blocking=True)
        return batch.float().contiguous(memory_format=torch.channels_last)

    def train_round(self, round_: int, progress=None, stop=None) -> tuple[dict[str, SoftLabels], ServerRoundStats]:
        """Train on every stored device's features; return soft labels per device and stats.

        Logs progress (:mod:`cloud_runtime.progress`); ``stop`` (an Event): raise :class:`~cloud_runtime.progress.
        Interrupted` between batches once it is set (the model is then part-trained: the caller discards it)."""
        if not self.train_store:
            raise RuntimeError("no training uploads to train on")
        devices = sorted(self.train_store)  # not arrival order: the same seed gives the same run, whoever uploads first
        parts = [self.train_store[d] for d in devices]
        features = torch.cat([p.features for p in parts])          # N x C x H x W
        teacher = torch.cat([p.client_logits for p in parts])       # N x K
        labels = torch.cat([p.labels for p in parts])               # N
        sizes = [len(p.sample_ids) for p in parts]
        n = len(labels)
        server_logits = torch.zeros(n, self.num_classes)
        use_kd = self.cfg.kd_beta > 0
        totals, seen, start = np.zeros(4), 0, time.perf_counter()
        epochs = self.cfg.epochs
        self.model.train()
        for epoch in range(epochs):
            last = epoch == epochs - 1
            totals[:] = 0
            seen = 0
            order = torch.from_numpy(self._rng.permutation(n))
            label = f"server round {round_} epoch {epoch + 1}/{epochs}"
            meter = ProgressLog(logger, label, n, after=(epochs - epoch - 1) * n)
            for index in _batches(order, self.cfg.batch_size):
                check_stop(stop, f"{label} at {seen:,}/{n:,} samples")
                out = self.model(self._gather(features, index))
                batch_labels = labels[index].to(self.device)
                loss, ce, kd = gkt_loss(out, batch_labels, teacher[index].to(self.device) if use_kd else None, None,
                                        self.cfg.kd_beta, self.cfg.temperature)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                if last and self.cfg.soft_labels == "last_epoch":
                    server_logits[index] = out.detach().float().cpu()
                b = len(index)
                totals += (float(loss.detach()) * b, float(ce) * b, float(kd) * b,
                           int((out.argmax(1) == batch_labels).sum()))
                seen += b
                meter.update(b, totals[0] / seen)  # the loss is already on the host (float() above)
                if progress is not None:
                    progress(b)
            meter.finish(totals[0] / max(seen, 1))
        if self.cfg.soft_labels == "eval_pass":
            meter = ProgressLog(logger, f"server round {round_} soft labels", n, quiet=True)
            server_logits = self._infer(features, meter=meter, stop=stop)
            meter.finish()
        seconds = time.perf_counter() - start
        loss, ce, kd, correct = totals / max(seen, 1)
        self.scheduler.step(loss)
        stats = ServerRoundStats(loss, ce, kd, correct, n * self.cfg.epochs, seconds,
                                 n * self.cfg.epochs / max(seconds, 1e-9), self.optimizer.param_groups[0]["lr"])
        replies, offset = {}, 0
        for device, part, size in zip(devices, parts, sizes):
            replies[device] = SoftLabels(device, round_, part.sample_ids, server_logits[offset:offset + size].clone())
            offset += size
        return replies, stats

    @torch.inference_mode()
    def _infer(self, features: torch.Tensor, batch_size: int = 256, meter: ProgressLog | None = None,
               stop=None) -> torch.Tensor:
        self.model.eval()
        out = []
        try:
            for i in range(0, len(features), batch_size):
                check_stop(stop, f"{meter.label if meter else 'inference'} at {i:,}/{len(features):,} samples")
                out.append(self.model(self._gather(features, torch.arange(i, min(i + batch_size, len(features)))))
                           .float().cpu())
                if meter is not None:
                    meter.update(len(out[-1]))
        finally:
            self.model.train()
        return torch.cat(out) if out else torch.zeros(0, self.num_classes)

    # -- evaluate --------------------------------------------------------------------------------

    @torch.inference_mode()
    def evaluate(self, uploads: list[FeatureUpload], round_: int | None = None, stop=None) -> EvalResult:
        """Accuracy of (device extractor -> server model) on each device's test features. Logs progress when
        it takes longer than :data:`~cloud_runtime.progress.QUIET_S`; ``stop``: as in :meth:`train_round`."""
        per_device, correct_total, loss_total, n_total = {}, 0, 0.0, 0
        label = "server evaluation" if round_ is None else f"server round {round_} evaluation"
        meter = ProgressLog(logger, label, sum(len(u.labels) for u in uploads), quiet=True)
        for upload in uploads:
            upload.validate(self.num_classes, self.feature_shape)
            logits = self._infer(upload.features, meter=meter, stop=stop)
            correct = int((logits.argmax(1) == upload.labels).sum())
            loss_total += float(nn.functional.cross_entropy(logits, upload.labels, reduction="sum"))
            n = len(upload.labels)
            edge_correct = int((upload.logits.argmax(1) == upload.labels).sum())
            per_device[upload.device_id] = {"accuracy": correct / max(n, 1), "samples": n,
                                            "edge_model_accuracy": edge_correct / max(n, 1)}
            correct_total += correct
            n_total += n
        meter.finish(loss_total / max(n_total, 1))
        return EvalResult(correct_total / max(n_total, 1), loss_total / max(n_total, 1), n_total, per_device)


def _batches(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """``order`` cut into batches of ``batch_size``; a last batch of one sample joins the one before it
    (BatchNorm cannot train on a single sample of 1x1 features)."""
    batches = list(torch.split(order, batch_size))
    if len(batches) > 1 and len(batches[-1]) == 1:
        batches[-2:] = [torch.cat(batches[-2:])]
    return batches
