"""The edge engine seam: what the agent needs from whatever trains and runs the model on a device.

Two engines (``engine`` in an agent's config, a device fact, so a fleet can mix them):

``torch``        the model zoo's modules and trainers (:mod:`edge_sdk.engines.torch_engine`);
``onnxruntime``  graphs the runtime compiled for the run, run by onnxruntime with numpy around them
                 (:mod:`edge_sdk.engines.onnx_engine`): the agent process never imports torch.

Torch-free: the agent talks to an engine in numpy arrays only (state by ``state_dict`` name, features,
logits), so the wire, the state file and the agent are the same whichever engine runs.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import numpy as np

from edgefl_core.codecs import UploadArrays
from edgefl_core.data.datasets import ImageDataset

ENGINES = ("torch", "onnxruntime")


@dataclass
class RoundStats:
    loss: float
    ce: float
    kd: float
    train_accuracy: float
    samples: int
    seconds: float
    samples_per_s: float
    kd_coverage: float  # fraction of local samples that had a server soft label this round


class EdgeEngine(ABC):
    """One device's model, trainer and soft labels (``soft_labels``: an :class:`~edge_sdk.soft_labels.SoftLabelStore`)."""

    name = "abstract"
    train_set: ImageDataset
    test_set: ImageDataset | None
    feature_channels: int | None
    trainable_params: int

    @abstractmethod
    def train_round(self, round_: int) -> RoundStats:
        """Local epochs on CE + α·KD to the soft labels held so far."""

    @abstractmethod
    def extract(self, split: str, round_: int) -> UploadArrays:
        """Features (N x C x h x w float32), logits (N x K float32) and labels of every sample of ``split``."""

    @abstractmethod
    def model_state(self) -> dict[str, np.ndarray]:
        """Parameters and buffers by ``state_dict`` name (copies)."""

    @abstractmethod
    def load_model_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace the model's tensors (names and shapes must match; raises ValueError)."""

    @abstractmethod
    def optimizer_state(self) -> dict[str, np.ndarray]:
        """The optimizer's state, portable: ``<param>.<key>`` (``momentum_buffer``; ``step``, ``exp_avg``,
        ``exp_avg_sq``), or engine-specific extras under ``trainer.`` for trainers only one engine runs."""

    @abstractmethod
    def load_optimizer_state(self, arrays: dict[str, np.ndarray]) -> None:
        """Inverse of :meth:`optimizer_state`; raises ValueError when it does not fit."""

    @abstractmethod
    def reset_optimizer(self) -> None:
        """Fresh optimizer state (FedAvg starts every round from the global model)."""

    def set_threads(self) -> None:
        """Make the engine's compute use the configured threads (a pool may be shared in memory mode)."""

    # -- extractor (FedGKT's stem): names relative to ``stem.`` as on the wire --------------------

    EXTRACTOR = "stem."

    def extractor_state(self) -> dict[str, np.ndarray]:
        return {k[len(self.EXTRACTOR):]: v for k, v in self.model_state().items() if k.startswith(self.EXTRACTOR)}

    def load_extractor(self, state: dict[str, np.ndarray]) -> None:
        mine = self.extractor_state()
        if set(state) != set(mine):
            raise ValueError("extractor tensors differ from this model's stem")
        self.load_model_state({self.EXTRACTOR + k: v for k, v in state.items()})

    def receive_soft_labels(self, sample_ids: np.ndarray, logits: np.ndarray, round_: int) -> None:
        """The server's soft labels (N int64 ids, N x K float32), each id one of this device's training samples.
        Raises KeyError / ValueError with nothing stored."""
        self.soft_labels.update(sample_ids, logits, round_)


def round_stats(totals: np.ndarray, samples: int, seconds: float, coverage: float) -> RoundStats:
    """``totals``: (loss·n, ce·n, kd·n, correct) summed over a round's steps."""
    loss, ce, kd, correct = totals / max(samples, 1)
    return RoundStats(loss, ce, kd, correct, samples, seconds, samples / max(seconds, 1e-9), coverage)
