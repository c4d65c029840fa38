"""One device's own data: its dataset, narrowed to the sample ids it was given (``data.ids_file``), with a
fingerprint that ties saved progress to the data it was made on."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import numpy as np

from edgefl_core.data.config import AgentDataConfig
from edgefl_core.data.datasets import DatasetError, ImageDataset, MissingSplit, load_dataset

logger = logging.getLogger(__name__)


def load_local_data(cfg: AgentDataConfig) -> tuple[ImageDataset, ImageDataset | None]:
    """(train, test or None) for ``cfg``; ``ids_file`` is JSON ``{"train": [...], "test": [...]}`` of
    int sample ids. A device's npz or image folder may have no test split (test is None). With
    ``cfg.fingerprint`` set, the data must still be that data. Raises DatasetError naming the file when
    it is missing, unreadable, not such an object, or not the pinned data."""
    train = load_dataset(cfg.dataset, "train", cfg.path)
    try:
        test = load_dataset(cfg.dataset, "test", cfg.path)
    except MissingSplit as e:
        logger.info("%s; the device evaluates nothing locally", e)
        test = None
    if cfg.ids_file:
        try:
            ids = json.loads(Path(cfg.ids_file).read_text())
            train_ids = np.asarray(ids["train"], dtype=np.int64)
            test_ids = np.asarray(ids.get("test", []), dtype=np.int64)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{cfg.ids_file}: not a sample-id file ({e})") from None
        try:
            train = train.subset(train.rows_of(train_ids))
            test = test.subset(test.rows_of(test_ids)) if len(test_ids) and test is not None else None
        except KeyError as e:
            raise DatasetError(f"{cfg.ids_file}: {e.args[0]}") from None
    if cfg.num_classes is not None:  # labels 0..k of a device that lacks the run's top classes
        for split in (train, test):
            if split is not None and len(split) and int(split.labels.max()) >= cfg.num_classes:
                raise DatasetError(f"{cfg.path or cfg.dataset}: labels reach {int(split.labels.max())}, "
                                   f"data.num_classes is {cfg.num_classes}")
        train = dataclasses.replace(train, num_classes=cfg.num_classes)
        test = dataclasses.replace(test, num_classes=cfg.num_classes) if test is not None else None
    check_splits(train, test, cfg.path or cfg.dataset)
    if cfg.fingerprint and data_fingerprint(train, test) != cfg.fingerprint:
        raise DatasetError(f"{cfg.path or cfg.dataset}: the data changed: its fingerprint is "
                           f"{data_fingerprint(train, test)}, data.fingerprint pins {cfg.fingerprint}")
    return train, test


def fit_to_run(train: ImageDataset, test: ImageDataset | None, num_classes, input_shape
               ) -> tuple[ImageDataset, ImageDataset | None]:
    """A device's splits fitted to the run's ``num_classes`` (int) and ``input_shape`` ([C, H, W]), as the
    runtime states them in ``run_facts`` (either may be absent: not checked). Labels that stop short of the
    run's classes take the run's count. Raises DatasetError when the images have another shape or the labels
    more classes than the run: such data cannot take part."""
    if isinstance(input_shape, list) and input_shape != list(train.image_shape):
        raise DatasetError(f"this device's images are {'x'.join(map(str, train.image_shape))} (C x H x W); the "
                           f"run's are {'x'.join(map(str, input_shape))}")
    if type(num_classes) is not int:
        return train, test
    if num_classes < train.num_classes:
        raise DatasetError(f"this device's data has {train.num_classes} classes; the run has {num_classes}")
    if num_classes > train.num_classes:
        logger.info("labels of this device's data stop at %d; the run has %d classes", train.num_classes - 1,
                    num_classes)
        train = dataclasses.replace(train, num_classes=num_classes)
        test = dataclasses.replace(test, num_classes=num_classes) if test is not None else None
    return train, test


def data_fingerprint(train: ImageDataset, test: ImageDataset | None) -> str:
    """``sha256:<16 hex>`` of both splits' shapes, images, labels and sample ids: the same data gives the
    same fingerprint on any machine; any changed pixel, label, id or order gives another."""
    h = hashlib.sha256()
    for split in (train, test):
        if split is None:
            h.update(b"none")
            continue
        h.update(json.dumps([list(split.images.shape), split.num_classes]).encode())
        for array in (split.images, split.labels.astype("<i8"), split.sample_ids.astype("<i8")):
            h.update(np.ascontiguousarray(array).data)
    return "sha256:" + h.hexdigest()[:16]


def describe_data(cfg: AgentDataConfig, train: ImageDataset, test: ImageDataset | None) -> dict:
    """What a device trains on, for its start-up log and ``edge-agent data check``."""
    counts = np.bincount(train.labels, minlength=train.num_classes).tolist()
    return {"dataset": cfg.dataset, "path": cfg.path, "ids_file": cfg.ids_file, "train_samples": len(train),
            "test_samples": len(test) if test is not None else 0, "image_shape": list(train.image_shape),
            "num_classes": train.num_classes, "class_counts": counts, "fingerprint": data_fingerprint(train, test)}


def export_shard(dataset: str, path: str | None, out: str | Path, shard: int, shards: int, *, train: int | None,
                 test: int | None, seed: int = 0) -> dict[str, Path]:
    """Write shard ``shard`` of ``shards`` (1-based) of a dataset as ``out/train.npz`` and ``out/test.npz``:
    a seeded random, disjoint slice of each split, at most ``train`` / ``test`` samples, original sample
    ids kept. For demos and tests that need devices with their own data files."""
    if not 1 <= shard <= shards:
        raise ValueError(f"shard {shard}/{shards}: must be in 1..{shards}")
    for name, limit in (("train", train), ("test", test)):
        if limit is not None and limit < 1:
            raise ValueError(f"--{name} {limit}: must be >= 1 (or left out: all of the shard)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, limit in (("train", train), ("test", test)):
        try:
            ds = load_dataset(dataset, split, path)
        except MissingSplit:
            continue  # a source without test data gives a shard without one
        if len(ds) < shards:
            raise ValueError(f"{split}: {len(ds)} samples cannot make {shards} shards")
        order = np.random.default_rng(seed + (split == "test")).permutation(len(ds))
        rows = np.array_split(order, shards)[shard - 1][:limit]
        part = ds.subset(np.sort(rows))
        written[split] = out / f"{split}.npz"
        np.savez_compressed(written[split], images=part.images, labels=part.labels, sample_ids=part.sample_ids,
                            num_classes=np.int64(ds.num_classes))
    return written


def check_splits(train: ImageDataset, test: ImageDataset | None, where: str) -> None:
    """Both splits of one device's data must agree: the same C x H x W and class count, labels in range.
    Raises DatasetError naming the data and split."""
    if test is None:
        return
    if test.image_shape != train.image_shape:
        raise DatasetError(f"{where}: test images are {test.image_shape} (C x H x W), train images "
                           f"{train.image_shape}")
    if len(test) and int(test.labels.max()) >= train.num_classes:
        raise DatasetError(f"{where}: test labels reach {int(test.labels.max())}, the train split has "
                           f"{train.num_classes} classes")
