"""Differential-privacy accounting of the features devices release (``edge_sdk/privacy.py``).

Each round a device uploads the features of every local training sample once: for one sample, R distinct
uploads are R adaptive compositions of the Gaussian mechanism (no subsampling: every sample goes up every
time). Adjacency is *replace one sample* (its image swapped for any other): sample ids and labels go up in
the clear, so membership is no secret, and what the noise must hide is the image. Two clipped feature maps
differ by at most 2·clip_norm in L2, so the noise N(0, (σ·clip_norm)²) is a Gaussian mechanism of effective
multiplier σ/2. R releases compose to one Gaussian mechanism of multiplier σ/(2√R) (Gaussian DP), whose ε at δ
comes from Google's ``dp-accounting`` library (the analytic Gaussian mechanism: Balle & Wang, ICML 2018), not from
a formula of ours.

The guarantee is a *feature-release* ε for the extractor as it is: the extractor's own training on the
sample, the labels and the edge logits are not covered (docs/PRIVACY.md says what each reveals).
"""
from __future__ import annotations

import functools
import math


def _gaussian_mechanism():
    try:
        from dp_accounting import gaussian_mechanism
    except ImportError as e:  # the cloud extra installs it
        raise ImportError(f"feature-privacy accounting needs dp-accounting ({e}): pip install dp-accounting") from None
    return gaussian_mechanism


@functools.lru_cache(maxsize=256)
def epsilon(noise_multiplier: float, releases: int, delta: float) -> float:
    """ε at ``delta`` after ``releases`` releases of one sample's features, each clipped to clip_norm with
    noise σ·clip_norm (``noise_multiplier`` = σ), under replace-one adjacency (sensitivity 2·clip_norm); inf
    when σ = 0. Raises ValueError for releases < 0 or delta outside (0, 1)."""
    if releases < 0 or not 0 < delta < 1:
        raise ValueError(f"releases must be >= 0 and delta in (0, 1), got {releases}, {delta}")
    if releases == 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    # R Gaussian releases of multiplier s (sensitivity 2·clip_norm: s = σ/2) are exactly one of multiplier
    # s/sqrt(R) (Gaussian DP composition: Dong, Roth & Su, JRSS-B 2022, Cor. 3.3), whose ε dp-accounting computes
    # exactly (the analytic Gaussian mechanism: Balle & Wang, ICML 2018) at the same cost for any R; its
    # privacy-loss-distribution accountant grew with R in time and memory (23 s at 10,000 releases, a
    # MemoryError at 20,000, which one device can make)
    exact = float(_gaussian_mechanism().get_epsilon_gaussian(noise_multiplier / 2 / math.sqrt(releases), delta))
    return exact * (1 + 1e-9) + 1e-12  # rounded up past the root finder's tolerance: never below the truth


@functools.lru_cache(maxsize=64)
def calibrate_noise(target_epsilon: float, delta: float, releases: int) -> float:
    """The smallest noise multiplier σ (to 0.5% relative) whose ``releases`` Gaussian releases stay within
    (``target_epsilon``, ``delta``). Raises ValueError for a non-positive target."""
    if not target_epsilon > 0:
        raise ValueError(f"target epsilon must be > 0, got {target_epsilon}")
    lo, hi = 1e-3, 1.0
    while epsilon(hi, releases, delta) > target_epsilon:  # bracket: ε falls as σ grows
        lo, hi = hi, hi * 2
        if hi > 1e5:
            raise ValueError(f"no noise multiplier up to 1e5 reaches epsilon {target_epsilon} at delta {delta}")
    while hi - lo > 5e-3 * hi:
        mid = (lo + hi) / 2
        lo, hi = (lo, mid) if epsilon(mid, releases, delta) <= target_epsilon else (mid, hi)
    return hi


def privacy_report(clip_norm: float | None, noise_multiplier: float, delta: float,
                   releases_per_device: dict[str, int], target_epsilon: float | None = None) -> dict:
    """``report.json``'s ``run.privacy``: the mechanism's settings, ε of one round's release and of the run
    (the device whose samples went up most often, named in ``releases_by``; null: no bound, σ = 0), and what the
    guarantee covers."""
    if clip_norm is None:
        return {"enabled": False}
    most = max(releases_per_device.values(), default=0)
    by = sorted(d for d, n in releases_per_device.items() if n == most) if most else []
    finite = lambda e: e if e != float("inf") else None  # noqa: E731  (JSON has no infinity: null = unbounded)
    return {"enabled": True, "clip_norm": clip_norm, "noise_multiplier": noise_multiplier, "delta": delta,
            "epsilon_target": target_epsilon,
            "epsilon_per_round": finite(epsilon(noise_multiplier, 1, delta)), "releases": most,
            "releases_by": by[:8],  # whose count it is: a device that re-sent changed bytes raised only its own
            "epsilon_run": finite(epsilon(noise_multiplier, most, delta)),
            "covers": "features as released (Gaussian mechanism, replace-one-sample adjacency); not labels, "
                      "edge logits or the extractor's training"}


def run_privacy(cfg, devices: dict[str, dict]) -> dict:
    """:func:`privacy_report` of a :class:`~cloud_runtime.config.RuntimeConfig` whose registry holds ``devices``:
    a device's releases are the distinct training-feature payloads the runtime saw from it, accepted or not
    (``feature_releases``, kept by ingest; an identical re-send is no new release)."""
    mechanism = cfg.recipe_for().privacy
    releases = {d: len(info.get("feature_releases", [])) for d, info in devices.items()}
    return privacy_report(mechanism.clip_norm, mechanism.noise_multiplier, cfg.privacy.delta, releases,
                          cfg.privacy.epsilon)
