"""Typed messages between edge and cloud. Algorithms speak these; transports only carry them.

Every per-sample tensor travels with the ``sample_ids`` it belongs to, so nothing is ever paired
by batch position.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from edge_sdk.wire import MessageError, check_sample_ids, round_frame_problem  # noqa: F401  (one namespace)


def _check_ids(sample_ids: np.ndarray, n: int, what: str) -> None:
    check_sample_ids(sample_ids, n, what)


def _check_finite(t: torch.Tensor, what: str) -> None:
    if not torch.isfinite(t).all():
        raise MessageError(f"{what} contains NaN or Inf")


@dataclass
class FeatureUpload:
    """Edge -> cloud: per-sample features (edge stem output), edge logits and labels."""

    device_id: str
    round: int
    split: str                 # "train" (server trains on it) or "test" (server evaluates it)
    sample_ids: np.ndarray     # N int64
    features: torch.Tensor     # N x C x H x W
    logits: torch.Tensor       # N x K (edge model's logits, the server's optional KD teacher)
    labels: torch.Tensor       # N int64
    metrics: dict = field(default_factory=dict)

    def validate(self, num_classes: int | None = None, feature_shape: tuple | None = None) -> None:
        what = f"upload from {self.device_id!r} (round {self.round}, {self.split})"
        if self.split not in ("train", "test"):
            raise MessageError(f"{what}: unknown split {self.split!r}")
        if np.ndim(self.sample_ids) != 1:
            raise MessageError(f"{what}: sample_ids must be a vector, got shape {np.shape(self.sample_ids)}")
        n = len(self.sample_ids)
        _check_ids(self.sample_ids, n, what)
        if self.features.dim() != 4 or self.features.shape[0] != n or min(self.features.shape[1:]) < 1:
            raise MessageError(f"{what}: features must be {n} x C x H x W (C, H, W >= 1), got "
                               f"{tuple(self.features.shape)}")
        if feature_shape is not None and tuple(self.features.shape[1:]) != tuple(feature_shape):
            raise MessageError(f"{what}: feature shape {tuple(self.features.shape[1:])}, expected {tuple(feature_shape)}")
        if self.logits.dim() != 2 or self.logits.shape[0] != n:
            raise MessageError(f"{what}: logits must be {n} x K, got {tuple(self.logits.shape)}")
        if num_classes is not None and self.logits.shape[1] != num_classes:
            raise MessageError(f"{what}: logits have {self.logits.shape[1]} classes, expected {num_classes}")
        if self.labels.shape != (n,) or self.labels.dtype != torch.int64:
            raise MessageError(f"{what}: labels must be {n} int64, got {self.labels.dtype} {tuple(self.labels.shape)}")
        if n and (self.labels.min() < 0 or self.labels.max() >= self.logits.shape[1]):
            raise MessageError(f"{what}: labels outside [0, {self.logits.shape[1]})")
        _check_finite(self.features, f"{what}: features")
        _check_finite(self.logits, f"{what}: logits")


@dataclass
class SoftLabels:
    """Cloud -> edge: the server model's logits for the device's samples, keyed by sample id."""

    device_id: str
    round: int
    sample_ids: np.ndarray     # N int64
    logits: torch.Tensor       # N x K

    def validate(self) -> None:
        what = f"soft labels for {self.device_id!r} (round {self.round})"
        if np.ndim(self.sample_ids) != 1:
            raise MessageError(f"{what}: sample_ids must be a vector, got shape {np.shape(self.sample_ids)}")
        _check_ids(self.sample_ids, len(self.sample_ids), what)
        if self.logits.dim() != 2 or self.logits.shape[0] != len(self.sample_ids):
            raise MessageError(f"{what}: logits must be {len(self.sample_ids)} x K, got {tuple(self.logits.shape)}")
        _check_finite(self.logits, f"{what}: logits")
