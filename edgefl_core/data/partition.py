"""Split a dataset among devices by stable sample id: IID ("homo") or per-class Dirichlet ("hetero").

The hetero rule is FedML's (``partition_data``'s "hetero" branch): for every class, draw
proportions ~ Dir(alpha) over devices, zero the share of any device that already holds more than
N / n_devices samples, renormalise, split the class's shuffled indices at those proportions, and
redraw everything until every device has at least ``min_samples`` samples. The result is a
mapping device index -> sample ids, saved as JSON so a run can be reproduced or audited.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np


class PartitionError(ValueError):
    pass


def partition_homo(sample_ids: np.ndarray, n_devices: int, seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shuffled = np.asarray(sample_ids)[rng.permutation(len(sample_ids))]
    return [np.sort(part) for part in np.array_split(shuffled, n_devices)]


def partition_hetero(sample_ids: np.ndarray, labels: np.ndarray, n_devices: int, alpha: float, seed: int,
                     min_samples: int = 10, max_tries: int = 1000) -> list[np.ndarray]:
    if alpha <= 0:
        raise PartitionError(f"Dirichlet alpha must be > 0, got {alpha}")
    if min_samples * n_devices > len(sample_ids):
        raise PartitionError(f"cannot give {n_devices} devices {min_samples} samples each from {len(sample_ids)}")
    rng = np.random.default_rng(seed)
    n = len(sample_ids)
    classes = np.unique(labels)
    for _ in range(max_tries):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
        sizes = np.zeros(n_devices, dtype=np.int64)
        for k in classes:
            idx_k = np.flatnonzero(labels == k)
            rng.shuffle(idx_k)
            proportions = rng.dirichlet(np.full(n_devices, alpha))
            proportions = proportions * (sizes < n / n_devices)  # full devices take no more
            proportions = proportions / proportions.sum()
            cuts = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
            for d, chunk in enumerate(np.split(idx_k, cuts)):
                parts[d].append(chunk)
                sizes[d] += len(chunk)
        if sizes.min() >= min_samples:
            return [np.sort(np.asarray(sample_ids)[np.concatenate(p)]) for p in parts]
    raise PartitionError(f"no Dirichlet(alpha={alpha}) draw gave every device >= {min_samples} samples "
                         f"in {max_tries} tries")


def make_partition(sample_ids: np.ndarray, labels: np.ndarray, n_devices: int, method: str, *,
                   alpha: float = 0.5, seed: int = 0, min_samples: int = 10) -> list[np.ndarray]:
    if n_devices <= 0:
        raise PartitionError(f"need at least one device, got {n_devices}")
    if len(sample_ids) < n_devices:
        raise PartitionError(f"{len(sample_ids)} samples cannot be split among {n_devices} devices")
    if method == "homo":
        return partition_homo(sample_ids, n_devices, seed)
    if method == "hetero":
        return partition_hetero(sample_ids, labels, n_devices, alpha, seed, min_samples)
    raise PartitionError(f"unknown partition method {method!r}; known: homo, hetero")


def save_partition(path: str | Path, parts: list[np.ndarray], meta: dict) -> None:
    payload = {"meta": meta, "devices": {str(d): ids.tolist() for d, ids in enumerate(parts)}}
    Path(path).write_text(json.dumps(payload))


def load_partition(path: str | Path) -> tuple[list[np.ndarray], dict]:
    try:
        payload = json.loads(Path(path).read_text())
        devices = payload["devices"]
        parts = [np.asarray(devices[str(d)], dtype=np.int64) for d in range(len(devices))]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise PartitionError(f"{path}: not a saved partition ({e})") from e
    return parts, payload.get("meta", {})
