"""The FedGKT edge client: local data, the extractor, its trainer and its soft labels.

Transport-free: a round is ``train_round`` (local epochs on CE + alpha * KD to the server's soft
labels), then ``extract`` (features, logits and labels of every local sample, keyed by sample id),
and later ``receive`` (the server's soft labels). The in-process simulator and the MQTT edge agent
both drive this class.
"""
from __future__ import annotations

import logging
import time
from typing import Protocol

import numpy as np
import torch
import torch.nn as nn

from edge_sdk.config import EdgeConfig
from edge_sdk.data.batching import ArrayLoader
from edgefl_core.data.datasets import ImageDataset
from edge_sdk.data.transforms import Augment
from edge_sdk.engine import RoundStats
from edge_sdk.messages import FeatureUpload, MessageError, SoftLabels
from edge_sdk.soft_labels import SoftLabelStore
from edge_sdk.trainers import StepResult, create_trainer

logger = logging.getLogger(__name__)


class StepCallback(Protocol):
    def __call__(self, device_id: str, round_: int, step: int, result: StepResult) -> None: ...


class EdgeClient:
    def __init__(self, device_id: str, model: nn.Module, train_set: ImageDataset, test_set: ImageDataset | None,
                 cfg: EdgeConfig, *, stats_name: str | None = None, seed: int = 0,
                 callbacks: tuple[StepCallback, ...] = ()):
        self.device_id = device_id
        self.model = model.to(memory_format=torch.channels_last)
        self.train_set = train_set
        self.test_set = test_set
        self.cfg = cfg
        self.trainer = create_trainer(cfg.trainer, self.model, cfg)
        self.soft_labels = SoftLabelStore(train_set.sample_ids, train_set.num_classes)
        self.callbacks = callbacks
        augment = Augment(cfg.augment.crop_padding, cfg.augment.hflip)
        self.train_loader = ArrayLoader(train_set, cfg.batch_size, shuffle=True, augment=augment,
                                         stats_name=stats_name, seed=seed)
        self._stats_name = stats_name

    # -- a round ---------------------------------------------------------------------------------

    def train_round(self, round_: int) -> RoundStats:
        totals = np.zeros(4)  # loss*n, ce*n, kd*n, correct
        samples, step, start = 0, 0, time.perf_counter()

        def record(result: StepResult) -> None:
            nonlocal samples, step
            totals[:] += (result.loss * result.samples, result.ce * result.samples,
                          result.kd * result.samples, result.correct)
            samples += result.samples
            for cb in self.callbacks:
                cb(self.device_id, round_, step, result)
            step += 1

        for _ in range(self.cfg.epochs):
            for batch in self.train_loader:
                teacher, has_teacher = self.soft_labels.lookup(batch.sample_ids)
                if has_teacher.any():
                    teacher, has_teacher = torch.from_numpy(teacher), torch.from_numpy(has_teacher)
                else:
                    teacher = has_teacher = None
                record(self.trainer.train_step(batch.images, batch.labels, teacher, has_teacher))
        for result in self.trainer.finish_round():  # pipelined trainers still hold the last batches
            record(result)
        seconds = time.perf_counter() - start
        loss, ce, kd, correct = totals / max(samples, 1)
        return RoundStats(loss, ce, kd, correct, samples, seconds, samples / max(seconds, 1e-9),
                          len(self.soft_labels) / max(len(self.train_set), 1))

    @torch.inference_mode()
    def extract(self, split: str, round_: int, batch_size: int = 256) -> FeatureUpload:
        """Features, logits and labels for every local sample of ``split``, without augmentation."""
        dataset = self.train_set if split == "train" else self.test_set
        if dataset is None:
            raise ValueError(f"device {self.device_id} has no {split} data")
        self.model.eval()
        features, logits = [], []
        for batch in ArrayLoader(dataset, batch_size, stats_name=self._stats_name):
            batch_logits, batch_features = self.model(batch.images)
            features.append(batch_features.contiguous())
            logits.append(batch_logits)
        return FeatureUpload(self.device_id, round_, split, dataset.sample_ids.copy(), torch.cat(features),
                             torch.cat(logits), torch.from_numpy(dataset.labels.copy()))

    def extractor_state(self) -> dict[str, torch.Tensor]:
        """The feature extractor's weights and BatchNorm statistics (what extractor averaging shares)."""
        return {k: v.detach().clone() for k, v in self._extractor().state_dict().items()}

    def load_extractor(self, state: dict[str, torch.Tensor]) -> None:
        self._extractor().load_state_dict(state)

    def _extractor(self) -> nn.Module:
        stem = getattr(self.model, "stem", None)
        if not isinstance(stem, nn.Module):
            raise ValueError(f"{type(self.model).__name__} has no .stem feature extractor to average")
        return stem

    def receive(self, message: SoftLabels) -> None:
        """Take the server's soft labels; every id must be one of this device's training samples."""
        message.validate()
        if message.device_id != self.device_id:
            raise MessageError(f"soft labels for {message.device_id!r} delivered to {self.device_id!r}")
        self.soft_labels.update(message.sample_ids, message.logits, message.round)
