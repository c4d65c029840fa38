"""Feature privacy on the device: what happens to each sample's feature map before it leaves.

The Gaussian mechanism (Dwork & Roth, "The Algorithmic Foundations of Differential Privacy", 2014, Thm. A.1;
its Rényi accounting: Mironov, "Rényi Differential Privacy", CSF 2017): every sample's feature map f (C x H x W)
is clipped to L2 norm at most ``clip_norm`` (f · min(1, clip_norm / ‖f‖₂)), then each element gets independent
N(0, (noise_multiplier · clip_norm)²) noise. Under add/remove-one-sample adjacency one release of one sample
has L2 sensitivity ``clip_norm``, so ``noise_multiplier`` is the mechanism's σ; the runtime's accountant
(``cloud_runtime/privacy.py``) turns it into ε at δ for the rounds a sample is released in.

What it covers, and what not (docs/PRIVACY.md): the features as released by a fixed extractor. Labels and
edge logits go up unprotected, and the extractor's own training on the sample is not privatized.

Torch-free (numpy), so both edge engines apply the same mechanism. The noise comes from the operating
system's entropy, never from the run's seed: a server that could replay the noise could remove it.
"""
from __future__ import annotations

import numpy as np


def clip_per_sample(features: np.ndarray, clip_norm: float) -> np.ndarray:
    """``features`` (N x ...) with each row scaled to L2 norm <= ``clip_norm`` (rows below it unchanged);
    float32, a new array."""
    flat = features.reshape(len(features), -1).astype(np.float32)                    # N x (C H W)
    norms = np.sqrt(np.einsum("ij,ij->i", flat, flat, dtype=np.float64))          # N
    scale = np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12)).astype(np.float32)
    return (flat * scale[:, None]).reshape(features.shape)


def privatize_features(features: np.ndarray, clip_norm: float | None, noise_multiplier: float,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """The Gaussian mechanism on ``features`` (N x C x H x W float32): per-sample clipping to ``clip_norm`` and
    N(0, (noise_multiplier · clip_norm)²) noise per element. ``clip_norm`` None returns ``features``
    unchanged. ``rng``: tests only (the default draws from OS entropy). Raises ValueError for a clip norm
    <= 0 or a negative noise multiplier."""
    if clip_norm is None:
        return features
    if not clip_norm > 0 or not noise_multiplier >= 0:
        raise ValueError(f"feature privacy: clip_norm must be > 0 and noise_multiplier >= 0, got {clip_norm}, "
                         f"{noise_multiplier}")
    out = clip_per_sample(features, clip_norm)
    if noise_multiplier > 0:
        rng = rng if rng is not None else np.random.default_rng()  # seeded from OS entropy
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(noise_multiplier * clip_norm)
    return out
