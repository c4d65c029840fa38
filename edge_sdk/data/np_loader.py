"""Batching and augmentation in numpy (the onnxruntime engine's data path; no torch).

The same batches as :class:`edge_sdk.data.batching.ArrayLoader`: shuffled per epoch, a last batch of a
single sample joins the one before it (BatchNorm cannot train on one sample), normalized with the
dataset's statistics, and augmented per batch (zero-pad + random crop, horizontal flip).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np

from edgefl_core.data.datasets import ImageDataset, dataset_stats


@dataclass
class NumpyBatch:
    images: np.ndarray      # B x C x H x W float32, normalized (and augmented when training)
    labels: np.ndarray      # B int64
    sample_ids: np.ndarray  # B int64


def random_crop(images: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad by ``padding`` and take one random H x W window per image (one fancy-index gather)."""
    if padding <= 0:
        return images
    n, c, h, w = images.shape
    padded = np.pad(images, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    dy = rng.integers(0, 2 * padding + 1, n)
    dx = rng.integers(0, 2 * padding + 1, n)
    rows = (dy[:, None] + np.arange(h)[None, :])[:, None, :, None]   # n x 1 x h x 1
    cols = (dx[:, None] + np.arange(w)[None, :])[:, None, None, :]   # n x 1 x 1 x w
    return padded[np.arange(n)[:, None, None, None], np.arange(c)[None, :, None, None], rows, cols]


def random_hflip(images: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    flip = rng.random(images.shape[0]) < p
    if flip.any():
        images = images.copy()
        images[flip] = images[flip][..., ::-1]
    return images


class NumpyLoader:
    """Iterate an :class:`ImageDataset` in (optionally shuffled, augmented) float32 batches."""

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool = False, crop_padding: int = 0,
                 hflip: bool = False, stats_name: str | None = None, seed: int = 0):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.dataset, self.batch_size, self.shuffle = dataset, batch_size, shuffle
        self.crop_padding, self.hflip = crop_padding, hflip
        channels = dataset.image_shape[0]
        mean, std = dataset_stats(stats_name) or ((0.5,) * channels, (0.25,) * channels)
        if len(mean) != channels:
            mean, std = (mean[0],) * channels, (std[0],) * channels
        self._mean = np.asarray(mean, np.float32).reshape(1, -1, 1, 1)
        self._std = np.asarray(std, np.float32).reshape(1, -1, 1, 1)
        self._rng = np.random.default_rng(seed)                  # shuffling: as ArrayLoader's
        self._augment_rng = np.random.default_rng([seed, 1])     # crops and flips: as ArrayLoader's

    def _bounds(self) -> list[int]:
        n = len(self.dataset)
        bounds = list(range(0, n, self.batch_size)) + [n]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            del bounds[-2]
        return bounds if n else [0]

    def __len__(self) -> int:
        return len(self._bounds()) - 1

    def __iter__(self) -> Iterator[NumpyBatch]:
        n = len(self.dataset)
        order = self._rng.permutation(n) if self.shuffle else np.arange(n)
        bounds = self._bounds()
        for start, end in zip(bounds[:-1], bounds[1:]):
            rows = order[start:end]
            images = (self.dataset.images[rows].astype(np.float32) / 255.0 - self._mean) / self._std
            if self.shuffle:  # training batches are augmented; extraction sees the images as they are
                images = random_crop(images, self.crop_padding, self._augment_rng)
                if self.hflip:
                    images = random_hflip(images, self._augment_rng)
            yield NumpyBatch(np.ascontiguousarray(images, dtype=np.float32),
                             self.dataset.labels[rows].astype(np.int64), self.dataset.sample_ids[rows])
