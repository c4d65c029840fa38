"""Batched image transforms on tensors (no torchvision): pad + random crop, horizontal flip, normalize.

They act on whole N x C x H x W batches at once, which is what makes CPU training from in-memory
uint8 arrays fast.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def to_float(images_u8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """uint8 N x C x H x W -> normalized float32."""
    return (images_u8.float().div_(255.0) - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def random_crop(images: torch.Tensor, padding: int, rng: np.random.Generator) -> torch.Tensor:
    """Zero-pad by ``padding`` and take one random H x W window per image (vectorized gather). Offsets are
    drawn from ``rng`` exactly as the numpy data path draws them (dy, then dx), so both engines see the same
    crops for the same seed."""
    if padding <= 0:
        return images
    n, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy = torch.from_numpy(rng.integers(0, 2 * padding + 1, n))
    dx = torch.from_numpy(rng.integers(0, 2 * padding + 1, n))
    rows = (dy.view(n, 1) + torch.arange(h).view(1, h))  # n x h
    cols = (dx.view(n, 1) + torch.arange(w).view(1, w))  # n x w
    batch = torch.arange(n).view(n, 1, 1, 1)
    chan = torch.arange(c).view(1, c, 1, 1)
    return padded[batch, chan, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


def random_hflip(images: torch.Tensor, rng: np.random.Generator, p: float = 0.5) -> torch.Tensor:
    flip = torch.from_numpy(rng.random(images.shape[0]) < p)
    if flip.any():
        images = images.clone()
        images[flip] = images[flip].flip(-1)
    return images


@dataclass(frozen=True)
class Augment:
    crop_padding: int = 0
    hflip: bool = False

    def __call__(self, images: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        images = random_crop(images, self.crop_padding, rng)
        if self.hflip:
            images = random_hflip(images, rng)
        return images
