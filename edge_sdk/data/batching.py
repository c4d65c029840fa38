"""Fast batching from in-memory uint8 arrays, carrying each sample's stable id with it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from edge_sdk.data.transforms import Augment, to_float
from edgefl_core.data.datasets import ImageDataset, dataset_stats


@dataclass
class Batch:
    images: torch.Tensor       # B x C x H x W float32, normalized (and augmented when training)
    labels: torch.Tensor       # B int64
    sample_ids: np.ndarray     # B int64
    rows: np.ndarray           # B positions in the dataset the batch came from


class ArrayLoader:
    """Iterate an :class:`ImageDataset` in (optionally shuffled, augmented) batches.

    The uint8 images are converted to a tensor once; each batch is an index, a cast and the
    vectorized augment, so no worker processes are needed on a 2-core device.
    """

    def __init__(self, dataset: ImageDataset, batch_size: int, *, shuffle: bool = False,
                 augment: Augment | None = None, stats_name: str | None = None, seed: int = 0,
                 drop_last: bool = False, channels_last: bool = True):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.drop_last = drop_last
        self.channels_last = channels_last
        self._images = torch.from_numpy(dataset.images)
        self._labels = torch.from_numpy(dataset.labels)
        mean, std = dataset_stats(stats_name) or ((0.5,) * dataset.image_shape[0], (0.25,) * dataset.image_shape[0])
        if len(mean) != dataset.image_shape[0]:
            mean, std = (mean[0],) * dataset.image_shape[0], (std[0],) * dataset.image_shape[0]
        self._mean, self._std = torch.tensor(mean), torch.tensor(std)
        # shuffling and augmentation draw from two numpy streams, as NumpyLoader's: same seed, same batches and
        # crops in either engine
        self._rng = np.random.default_rng(seed)
        self._augment_rng = np.random.default_rng([seed, 1])

    def _bounds(self) -> list[int]:
        """Batch boundaries; a last batch of a single sample joins the one before it (BatchNorm cannot train
        on one sample whose feature maps have shrunk to 1x1)."""
        n = len(self.dataset)
        stop = n - n % self.batch_size if self.drop_last else n
        bounds = list(range(0, stop, self.batch_size)) + [stop]
        if len(bounds) > 2 and bounds[-1] - bounds[-2] == 1:
            del bounds[-2]
        return bounds if stop else [0]

    def __len__(self) -> int:
        return len(self._bounds()) - 1

    def __iter__(self) -> Iterator[Batch]:
        n = len(self.dataset)
        order = self._rng.permutation(n) if self.shuffle else np.arange(n)
        bounds = self._bounds()
        for start, end in zip(bounds[:-1], bounds[1:]):
            rows = order[start:end]
            index = torch.from_numpy(rows)
            images = to_float(self._images[index], self._mean, self._std)
            if self.augment is not None:
                images = self.augment(images, self._augment_rng)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield Batch(images, self._labels[index], self.dataset.sample_ids[rows], rows)
