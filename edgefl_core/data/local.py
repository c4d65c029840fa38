"""One device's own data: its dataset, narrowed to the sample ids it was given (``data.ids_file``)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edgefl_core.data.config import AgentDataConfig
from edgefl_core.data.datasets import DatasetError, ImageDataset, load_dataset


def load_local_data(cfg: AgentDataConfig) -> tuple[ImageDataset, ImageDataset | None]:
    """(train, test or None) for ``cfg``; ``ids_file`` is JSON ``{"train": [...], "test": [...]}`` of
    int sample ids. Raises DatasetError naming the file when it is unreadable or not such an object."""
    train = load_dataset(cfg.dataset, "train", cfg.path)
    test = load_dataset(cfg.dataset, "test", cfg.path)
    if cfg.ids_file:
        try:
            ids = json.loads(Path(cfg.ids_file).read_text())
            train_ids = np.asarray(ids["train"], dtype=np.int64)
            test_ids = np.asarray(ids.get("test", []), dtype=np.int64)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise DatasetError(f"{cfg.ids_file}: not a sample-id file ({e})") from None
        train = train.subset(train.rows_of(train_ids))
        test = test.subset(test.rows_of(test_ids)) if len(test_ids) else None
    check_splits(train, test, cfg.path or cfg.dataset)
    return train, test


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
