"""Feature privacy on the device: what happens to each sample's feature map before it leaves.

The Gaussian mechanism (Dwork & Roth, "The Algorithmic Foundations of Differential Privacy", 2014, Thm. A.1):
every sample's feature map f (C x H x W)
is clipped to L2 norm at most ``clip_norm`` (f · min(1, clip_norm / ‖f‖₂)), then each element gets independent
N(0, (noise_multiplier · clip_norm)²) noise. Replacing one sample's image changes its clipped features by at
most 2 · clip_norm in L2; the runtime's accountant (``cloud_runtime/privacy.py``) turns that into ε at δ for
the times a sample is released.

What it covers, and what not (docs/PRIVACY.md): the features as released by a fixed extractor. Labels and
edge logits go up unprotected, and the extractor's own training on the sample is not privatized.

Torch-free (numpy), so both edge engines apply the same mechanism. The noise is never drawn from the run's
seed (a server that could replay it could remove it): it comes from a device secret (``privacy.key`` in the
state directory, 32 bytes of OS entropy) hashed with the features themselves, so the same features always
go up as the very same release (a re-send, a new runtime session, a new run instance announcing the round
again), while different features always get fresh noise. Without a key, the operating system's entropy.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)

KEY_FILE = "privacy.key"
_BLOCK = 256  # samples per block: the noise is drawn block by block (a small device's peak holds one block)


def device_key(state_dir: str | Path) -> bytes:
    """This device's secret for drawing noise: ``<state_dir>/privacy.key`` (32 bytes, created from OS entropy
    with mode 0600 on first use). Raises OSError when it can be neither read nor created."""
    path = Path(state_dir) / KEY_FILE
    try:
        key = path.read_bytes()
        if len(key) == 32:
            return key
        # a damaged key cannot be repaired: the new one draws fresh noise for features already released, and the
        # runtime's accountant counts each such copy as one more release (a larger epsilon)
        logger.warning("%s holds %d bytes, not 32: replaced by a new key. Features this device releases again "
                       "now carry fresh noise, which the runtime counts as further releases", path, len(key))
    except FileNotFoundError:
        pass
    key = os.urandom(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return key


def noise_rng(key: bytes | None, features: np.ndarray) -> np.random.Generator:
    """The generator for one release: seeded by SHA-256 of ``key`` and the features' bytes only, so the same
    features get the same noise whatever round, split or run instance they are announced under (a runtime
    cannot collect independently noised copies to average); OS entropy when ``key`` is None."""
    if key is None:
        return np.random.default_rng()
    h = hashlib.sha256(key)
    h.update(np.ascontiguousarray(features).view(np.uint8).reshape(-1))
    return np.random.default_rng(np.frombuffer(h.digest(), dtype=np.uint32))


def clip_per_sample(features: np.ndarray, clip_norm: float) -> np.ndarray:
    """``features`` (N x ...) with each row scaled to L2 norm <= ``clip_norm`` (rows below it unchanged);
    float32, a new array."""
    out = np.array(features, dtype=np.float32, order="C", copy=True)  # C order: the row view below is a view
    flat = out.reshape(len(out), -1)                                                  # N x (C H W), a view
    norms = np.sqrt(np.einsum("ij,ij->i", flat, flat, dtype=np.float64))          # N
    flat *= np.minimum(1.0, clip_norm / np.maximum(norms, 1e-12)).astype(np.float32)[:, None]
    return out


def privatize_features(features: np.ndarray, clip_norm: float | None, noise_multiplier: float,
                       rng: np.random.Generator | None = None) -> np.ndarray:
    """The Gaussian mechanism on ``features`` (N x C x H x W float32): per-sample clipping to ``clip_norm`` and
    N(0, (noise_multiplier · clip_norm)²) noise per element. ``clip_norm`` None returns ``features``
    unchanged. ``rng``: :func:`noise_rng` (default: OS entropy). Raises ValueError for a clip norm <= 0 or a
    negative noise multiplier."""
    if clip_norm is None:
        return features
    if not clip_norm > 0 or not noise_multiplier >= 0:
        raise ValueError(f"feature privacy: clip_norm must be > 0 and noise_multiplier >= 0, got {clip_norm}, "
                         f"{noise_multiplier}")
    out = clip_per_sample(features, clip_norm)
    if noise_multiplier > 0:
        rng = rng if rng is not None else np.random.default_rng()
        scale = np.float32(noise_multiplier * clip_norm)
        for i in range(0, len(out), _BLOCK):
            block = out[i:i + _BLOCK]
            block += rng.standard_normal(block.shape, dtype=np.float32) * scale
    return out
