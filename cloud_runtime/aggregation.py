"""Model aggregation as pure functions over state dicts (name -> float array).

FedAvg weighted by sample count, robust aggregators for untrusted devices (coordinate-wise median,
trimmed mean, norm clipping of updates), FedBuff-style staleness weighting for async rounds, and
the layer-wise client divergence of the deeper-models FL study (Wang et al., arXiv:2306.02701, eq. 1).
Results keep each tensor's dtype, exactly where they can (identical states come back bit for bit; integer
tensors are rounded half to even, never truncated). Inputs are validated first: empty
rounds, weights that do not sum to a positive number, mismatched names/shapes and non-finite
values are errors that say which client and which tensor.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from edgefl_core.registry import Registry

State = Mapping[str, np.ndarray]


class AggregationError(ValueError):
    pass


def validate_states(states: Sequence[State], weights: Sequence[float] | None = None) -> np.ndarray:
    """Check a round's client states; returns the weights normalised to sum to 1."""
    if not states:
        raise AggregationError("nothing to aggregate: the round has no client models")
    reference = states[0]
    for i, state in enumerate(states):
        if set(state) != set(reference):
            missing, extra = set(reference) - set(state), set(state) - set(reference)
            raise AggregationError(f"client {i}: tensor names differ (missing {sorted(missing)[:3]}, "
                                   f"extra {sorted(extra)[:3]})")
        for name, value in state.items():
            if np.shape(value) != np.shape(reference[name]):
                raise AggregationError(f"client {i}: {name} has shape {np.shape(value)}, "
                                       f"expected {np.shape(reference[name])}")
            if not np.all(np.isfinite(value)):
                raise AggregationError(f"client {i}: {name} contains NaN or Inf")
    w = np.ones(len(states)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(states),):
        raise AggregationError(f"{len(states)} client models but {w.size} weights")
    if np.any(w < 0) or not np.all(np.isfinite(w)):
        raise AggregationError(f"weights must be finite and >= 0, got {w.tolist()}")
    if w.sum() <= 0:
        raise AggregationError(f"weights sum to {w.sum()}: nothing to average")
    return w / w.sum()


def _cast_like(value: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """Back to the clients' dtype: integer and boolean tensors (e.g. num_batches_tracked) rounded half to even,
    never truncated (a truncating cast turns 6.999999999999999 into 6)."""
    value = np.asarray(value)
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        value = np.rint(value)
    return np.asarray(value.astype(dtype))


def weighted_mean(tensors: Sequence[np.ndarray], w: np.ndarray) -> np.ndarray:
    """Weighted mean of same-shaped tensors (``w``: normalised weights), in their dtype, exact where it can be.

    Computed as the first tensor plus the weighted mean of the others' deviations from it, in float64, so that
    identical tensors come back bit for bit whatever the dtype (``x/3 + 2x/3`` is not ``x`` in floating point,
    and an int64 past 2**53 is not even representable in float64), and integers are rounded (:func:`_cast_like`)."""
    first = np.asarray(tensors[0])
    dtype = first.dtype
    base = first.astype(np.float64)
    deviation = np.zeros_like(base)
    integer = np.issubdtype(dtype, np.integer)
    for wi, t in zip(w[1:], tensors[1:]):  # integers: the difference taken in int64 (exact), then scaled
        if integer:
            deviation += wi * (np.asarray(t).astype(np.int64) - first.astype(np.int64)).astype(np.float64)
        else:
            deviation += wi * (np.asarray(t).astype(np.float64) - base)
    if not deviation.any():
        return first.copy()
    if np.issubdtype(dtype, np.integer) and dtype.itemsize == 8:  # int64 / uint64: the step added in integers,
        step = np.floor(deviation)                                 # the total rounded half to even
        low = first.astype(np.int64) + step.astype(np.int64)
        frac = deviation - step
        return np.asarray(low + ((frac > 0.5) | ((frac == 0.5) & (low % 2 == 1)))).astype(dtype)
    return _cast_like(base + deviation, dtype)


def fedavg(states: Sequence[State], weights: Sequence[float] | None = None) -> dict[str, np.ndarray]:
    """Weighted mean of each tensor (weights = local sample counts in FedAvg; McMahan et al. 2017, Alg. 1),
    in each tensor's dtype (:func:`weighted_mean`: identical states are returned unchanged, integers rounded)."""
    w = validate_states(states, weights)
    return {name: weighted_mean([s[name] for s in states], w) for name in states[0]}


def coordinate_median(states: Sequence[State]) -> dict[str, np.ndarray]:
    """Element-wise median: robust to fewer than half of the clients being arbitrary."""
    validate_states(states)
    n = len(states)
    out = {}
    for name in states[0]:
        ordered = np.sort(np.stack([s[name] for s in states]), axis=0)   # clients x tensor shape
        # the middle element in its own dtype (exact: np.median would pass int64 through float64 and
        # turn 2**53 + 1 into 2**53); an even count takes the exact mean of the two middle ones
        out[name] = ordered[n // 2].copy() if n % 2 else weighted_mean([ordered[n // 2 - 1], ordered[n // 2]],
                                                                       np.array([0.5, 0.5]))
    return out


def trimmed_mean(states: Sequence[State], trim_fraction: float = 0.1) -> dict[str, np.ndarray]:
    """Element-wise mean after dropping the ``trim_fraction`` largest and smallest values."""
    validate_states(states)
    if not 0 <= trim_fraction < 0.5:
        raise AggregationError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    k = int(np.floor(trim_fraction * len(states)))
    kept = len(states) - 2 * k
    out = {}
    for name in states[0]:
        stacked = np.sort(np.stack([s[name] for s in states]), axis=0)
        out[name] = weighted_mean(list(stacked[k:len(states) - k]), np.full(kept, 1.0 / kept))
    return out


def tolerated_outliers(aggregator: str, n: int, trim_fraction: float = 0.1) -> int:
    """How many of ``n`` updates may be arbitrary before they can move the aggregate anywhere (its breakdown
    point in updates): ``fedavg`` 0; ``median`` (n-1)//2; ``trimmed_mean`` floor(trim_fraction x n), the
    updates it drops at each end (Yin et al. 2018, "Byzantine-robust distributed learning"). 0 for a robust
    rule means that with this many updates it is no more robust than the mean."""
    if aggregator == "median":
        return max(0, (n - 1) // 2)
    if aggregator == "trimmed_mean":
        return int(np.floor(trim_fraction * n))
    return 0


def updates_to_tolerate_one(aggregator: str, trim_fraction: float = 0.1) -> int | None:
    """The fewest updates over which ``aggregator`` tolerates one outlier (:func:`tolerated_outliers` >= 1);
    None where no count does (``fedavg``, ``trim_fraction`` 0)."""
    if aggregator not in ("median", "trimmed_mean") or (aggregator == "trimmed_mean" and trim_fraction <= 0):
        return None
    # trimmed_mean: floor(fraction x n) >= 1 from about 1 / fraction on, so start there
    n = max(1, math.floor(1 / trim_fraction)) if aggregator == "trimmed_mean" else 1
    while tolerated_outliers(aggregator, n, trim_fraction) < 1:
        n += 1
    return n


def update_norm(state: State, reference: State) -> float:
    return float(np.sqrt(sum(np.sum((np.asarray(state[n], np.float64) - reference[n]) ** 2) for n in reference)))


def clip_update(state: State, reference: State, max_norm: float) -> dict[str, np.ndarray]:
    """Scale the update (state - reference) down to ``max_norm`` if it is longer."""
    norm = update_norm(state, reference)
    if norm <= max_norm or norm == 0:
        return {n: np.asarray(state[n]).copy() for n in reference}  # unchanged: exactly the state
    scale = max_norm / norm
    return {n: _cast_like(np.asarray(reference[n], np.float64)
                          + scale * (np.asarray(state[n], np.float64) - np.asarray(reference[n], np.float64)),
                          np.asarray(state[n]).dtype) for n in reference}


def clip_to_median(states: Sequence[State], reference: State, clip_multiplier: float
                   ) -> tuple[list[dict[str, np.ndarray]], list[float], float]:
    """Clip every update to ``clip_multiplier`` x the round's median update norm (a median of 0 clips every
    update to the reference). Returns (clipped states, each update's norm before clipping, the bound)."""
    norms = [update_norm(s, reference) for s in states]
    bound = clip_multiplier * float(np.median(norms)) if norms else 0.0
    clipped = [clip_update(s, reference, bound) for s in states]
    return clipped, norms, bound


def clipped_fedavg(states: Sequence[State], reference: State, weights: Sequence[float] | None = None,
                   clip_multiplier: float = 3.0) -> tuple[dict[str, np.ndarray], list[float]]:
    """FedAvg of updates clipped to ``clip_multiplier`` x the median update norm; returns norms too."""
    validate_states(list(states) + [reference])
    clipped, norms, _ = clip_to_median(states, reference, clip_multiplier)
    return fedavg(clipped, weights), norms


# name -> (states, weights, options) -> aggregated state; ``fedavg.aggregator`` picks one
AGGREGATORS: Registry[Callable[[Sequence[State], Sequence[float], Mapping[str, Any]], dict]] = Registry("aggregator")
AGGREGATORS.register("fedavg")(lambda states, weights, options: fedavg(states, weights))
AGGREGATORS.register("median")(lambda states, weights, options: coordinate_median(states))
AGGREGATORS.register("trimmed_mean")(lambda states, weights, options: trimmed_mean(states, options["trim_fraction"]))


def staleness_weights(staleness: Sequence[int], exponent: float = 0.5) -> np.ndarray:
    """FedBuff-style discount 1 / (1 + s)^exponent for updates ``s`` server versions old."""
    s = np.asarray(staleness, dtype=np.float64)
    if np.any(s < 0):
        raise AggregationError(f"staleness must be >= 0, got {s.tolist()}")
    return 1.0 / (1.0 + s) ** exponent


def _distances(states: Sequence[State], average: State | None):
    """(name, the average's tensor in float64, each client's L2 distance to it) per floating-point tensor
    (integer tensors, counters such as num_batches_tracked, are skipped); ``average`` defaults to FedAvg."""
    validate_states(states)
    average = average if average is not None else fedavg(states)
    for name, avg in average.items():
        avg = np.asarray(avg)
        if np.issubdtype(avg.dtype, np.floating):
            ref = avg.astype(np.float64)
            yield name, ref, [float(np.linalg.norm(np.asarray(s[name], np.float64) - ref)) for s in states]


def layer_divergence(states: Sequence[State], average: State | None = None) -> dict[str, float]:
    """Per floating-point tensor, the layer divergence of the deeper-models FL study (Wang et al., "Unlocking the
    Potential of Federated Learning for Deeper Models", arXiv:2306.02701, eq. 1): the mean over
    the K clients of the root-mean-square difference between client k's tensor and the average,

        div(l) = (1/K) * sum_k sqrt( ||w_k(l) - w_avg(l)||^2 / d(l) ),   d(l) = number of elements of tensor l,

    so it is in the weights' own units and comparable with the study's figures. ``average``: the aggregated
    state (default: the unweighted FedAvg of ``states``). Integer tensors (counters) are skipped."""
    return {name: float(np.mean(distances) / np.sqrt(max(ref.size, 1)))
            for name, ref, distances in _distances(states, average)}


def relative_layer_divergence(states: Sequence[State], average: State | None = None) -> dict[str, float]:
    """Per floating-point tensor: mean over clients of ||w_k - w_avg|| / ||w_avg|| (scale-free; the form this
    project reported before it used eq. 1 of the deeper-models study: :func:`layer_divergence`)."""
    return {name: float(np.mean(distances) / (float(np.linalg.norm(ref)) or 1.0))
            for name, ref, distances in _distances(states, average)}


def average_torch_states(states, weights):
    """:func:`fedavg` of torch state dicts (e.g. FedGKT extractors); integer buffers are rounded."""
    import torch
    average = fedavg([{k: v.detach().cpu().numpy() for k, v in s.items()} for s in states], weights)
    return {k: torch.from_numpy(v) for k, v in average.items()}
