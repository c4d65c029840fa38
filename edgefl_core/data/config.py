"""The data sections of configs: the experiment's split among devices, and one device's own data."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from edgefl_core.config import require
from edgefl_core.data.datasets import DATASETS


def check_dataset(name: str, path: str | None) -> None:
    require(name in DATASETS, "dataset", f"unknown dataset {name!r}; known: {', '.join(DATASETS.names())}")
    require(not DATASETS.get(name).needs_path or bool(path), "path", f"the {name} dataset needs a path")


@dataclass
class DataConfig:
    """Which dataset, and how it is split among devices (stable sample ids throughout)."""

    dataset: str = "fashion_mnist"          # a registered dataset (edgefl_core.data.datasets.DATASETS)
    path: str | None = None            # default for fashion_mnist: /usr/share/datasets/fashion-mnist
    train_subset: int | None = None    # first-come stratified subset of the training split (None = all)
    test_subset: int | None = None     # None = the whole test split
    partition: Literal["homo", "hetero"] = "homo"
    alpha: float = 0.5                 # Dirichlet concentration for "hetero"
    min_samples_per_device: int = 10
    test_split: Literal["shard", "full"] = "shard"  # shard: each test image is seen by one device

    def check(self) -> None:
        require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            require(value is None or value > 0, name, f"must be > 0 or null, got {value}")
        check_dataset(self.dataset, self.path)


@dataclass
class AgentDataConfig:
    dataset: str = "fashion_mnist"          # a registered dataset (edgefl_core.data.datasets.DATASETS)
    path: str | None = None
    ids_file: str | None = None   # JSON {"train": [...], "test": [...]} of sample ids; null = whole dataset
    fingerprint: str | None = None  # sha256:<16 hex> (edge-agent data check): refuse to start on other data
    num_classes: int | None = None  # the run's class count when this device's labels do not reach the top class

    def check(self) -> None:
        check_dataset(self.dataset, self.path)
        require(self.num_classes is None or 2 <= self.num_classes <= 100_000, "num_classes", "must be in [2, 100000]")
        require(self.fingerprint is None or (self.fingerprint.startswith("sha256:") and len(self.fingerprint) == 23),
                "fingerprint", f"expected sha256:<16 hex digits> as edge-agent data check prints it, got "
                f"{self.fingerprint!r}")
