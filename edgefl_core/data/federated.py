"""Turn a :class:`DataConfig` into per-device train/test sets with stable sample ids."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefl_core.data.config import DataConfig
from edgefl_core.data.datasets import ImageDataset, dataset_stats, load_dataset
from edgefl_core.data.partition import make_partition, partition_homo, save_partition

logger = logging.getLogger(__name__)


@dataclass
class FederatedData:
    train: list[ImageDataset]      # one per device
    test: list[ImageDataset]       # one per device (a shard, or the whole test set)
    test_all: ImageDataset
    num_classes: int
    stats_name: str | None         # a dataset with normalization stats (dataset_stats), or None
    train_class_counts: np.ndarray  # devices x classes

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.test_all.image_shape


def stratified_subset(dataset: ImageDataset, size: int, seed: int) -> ImageDataset:
    """A seeded subset of ``size`` samples with the class mix of the whole (ids unchanged)."""
    if size >= len(dataset):
        return dataset
    rng = np.random.default_rng(seed)
    rows = []
    for k in np.unique(dataset.labels):
        idx = np.flatnonzero(dataset.labels == k)
        take = int(round(size * len(idx) / len(dataset)))
        rows.append(rng.choice(idx, size=min(take, len(idx)), replace=False))
    return dataset.subset(np.sort(np.concatenate(rows)))


def prepare(cfg: DataConfig, n_devices: int, seed: int, out_dir: str | Path | None = None) -> FederatedData:
    train = load_dataset(cfg.dataset, "train", cfg.path)
    test = load_dataset(cfg.dataset, "test", cfg.path)
    if cfg.train_subset:
        train = stratified_subset(train, cfg.train_subset, seed)
    if cfg.test_subset:
        test = stratified_subset(test, cfg.test_subset, seed + 1)
    parts = make_partition(train.sample_ids, train.labels, n_devices, cfg.partition, alpha=cfg.alpha, seed=seed,
                           min_samples=cfg.min_samples_per_device)
    train_sets = [train.subset(train.rows_of(ids)) for ids in parts]
    if cfg.test_split == "shard":
        test_sets = [test.subset(test.rows_of(ids)) for ids in partition_homo(test.sample_ids, n_devices, seed)]
    else:
        test_sets = [test] * n_devices
    counts = np.stack([np.bincount(s.labels, minlength=train.num_classes) for s in train_sets])
    if out_dir is not None:
        save_partition(Path(out_dir) / "partition.json", parts,
                       {"dataset": cfg.dataset, "method": cfg.partition, "alpha": cfg.alpha, "seed": seed,
                        "train_subset": cfg.train_subset, "class_counts": counts.tolist()})
    stats = cfg.dataset if dataset_stats(cfg.dataset) else None
    logger.info("partition %s over %d devices: samples per device %s", cfg.partition, n_devices,
                [len(s) for s in train_sets])
    return FederatedData(train_sets, test_sets, test, train.num_classes, stats, counts)


__all__ = ["FederatedData", "prepare", "stratified_subset"]
