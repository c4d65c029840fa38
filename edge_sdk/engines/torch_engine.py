"""The torch engine: the model zoo's module and the edge trainers (:class:`~edge_sdk.client.EdgeClient`)."""
from __future__ import annotations

import io

import numpy as np
import torch

from edge_sdk.client import EdgeClient
from edge_sdk.config import EdgeConfig
from edge_sdk.engine import EdgeEngine, RoundStats
from edge_sdk.trainers import create_trainer
from edgefl_core.codecs import UploadArrays
from edgefl_core.data.datasets import ImageDataset
from model_zoo import create_model, seeded

OPAQUE = "trainer.torch"  # state of trainers only torch runs (aux heads, pipelines): torch.save bytes


class TorchEngine(EdgeEngine):
    name = "torch"

    def __init__(self, device: str, edge: EdgeConfig, train: ImageDataset, test: ImageDataset | None, *,
                 stats_name: str | None, seed: int, threads: int | None, init_seed: int | None = None):
        """``init_seed``: the run's seed of the initial model (the runtime's, so every device of a run starts
        from the same model whichever its engine); ``seed``: this device's shuffling and augmentation."""
        self.threads = threads
        self.set_threads()
        with seeded(seed if init_seed is None else init_seed):
            model = create_model(edge.model, num_classes=train.num_classes, in_channels=train.image_shape[0],
                                 **edge.model_kwargs)
        with seeded(seed):
            self.client = EdgeClient(device, model, train, test, edge, stats_name=stats_name, seed=seed)
        self.edge = edge
        self.train_set, self.test_set = train, test
        self.soft_labels = self.client.soft_labels
        self.feature_channels = getattr(model, "feature_channels", None)
        self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)

    def set_threads(self) -> None:
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def train_round(self, round_: int) -> RoundStats:
        return self.client.train_round(round_)

    def extract(self, split: str, round_: int) -> UploadArrays:
        up = self.client.extract(split, round_)
        return UploadArrays(split, up.sample_ids, up.features.float().numpy(), up.logits.float().numpy(),
                            up.labels.numpy(), {})

    def model_state(self) -> dict[str, np.ndarray]:
        return {k: v.detach().cpu().numpy().copy() for k, v in self.client.model.state_dict().items()}

    def load_model_state(self, state: dict[str, np.ndarray]) -> None:
        current = self.client.model.state_dict()
        if set(state) - set(current):
            raise ValueError(f"{sorted(set(state) - set(current))[:3]} are not tensors of this edge model")
        for k, v in state.items():
            if tuple(v.shape) != tuple(current[k].shape):
                raise ValueError(f"{k!r}: shape {tuple(v.shape)}, expected {tuple(current[k].shape)}")
        self.client.model.load_state_dict({k: torch.from_numpy(np.asarray(v)).to(current[k].dtype)
                                           for k, v in state.items()}, strict=False)

    # -- optimizer state: portable names for the optimizer over the model's parameters ----------------

    def _portable(self) -> bool:
        optimizer = getattr(self.client.trainer, "optimizer", None)
        return (optimizer is not None and len(optimizer.param_groups) == 1 and
                [id(p) for p in optimizer.param_groups[0]["params"]] == [id(p) for p in self.client.model.parameters()]
                and self.client.trainer.state_dict().keys() == {"optimizer"})

    def optimizer_state(self) -> dict[str, np.ndarray]:
        if not self._portable():
            buffer = io.BytesIO()
            torch.save(self.client.trainer.state_dict(), buffer)
            return {OPAQUE: np.frombuffer(buffer.getvalue(), dtype=np.uint8).copy()}
        names = [n for n, _ in self.client.model.named_parameters()]
        state = self.client.trainer.optimizer.state_dict()["state"]
        return {f"{names[i]}.{key}": value.detach().cpu().numpy().copy()
                for i, entry in state.items() for key, value in entry.items() if isinstance(value, torch.Tensor)}

    def load_optimizer_state(self, arrays: dict[str, np.ndarray]) -> None:
        if OPAQUE in arrays:
            try:
                state = torch.load(io.BytesIO(arrays[OPAQUE].tobytes()), weights_only=True)
                self.client.trainer.load_state_dict(state)
            except Exception as e:
                raise ValueError(f"the trainer's saved state does not load ({type(e).__name__}: {e})") from None
            return
        if not self._portable():
            if arrays:
                raise ValueError(f"edge.trainer={self.edge.trainer} keeps state another engine did not save")
            return
        optimizer = self.client.trainer.optimizer
        index = {n: i for i, (n, _) in enumerate(self.client.model.named_parameters())}
        shapes = {n: tuple(p.shape) for n, p in self.client.model.named_parameters()}
        keys = {"sgd": {"momentum_buffer"}, "adam": {"step", "exp_avg", "exp_avg_sq"}}[self.edge.optimizer]
        state: dict[int, dict] = {}
        for flat, value in arrays.items():
            name, _, key = flat.rpartition(".")
            if name not in index or key not in keys:
                raise ValueError(f"optimizer state {flat!r} is not {self.edge.optimizer}'s for this model")
            if key != "step" and tuple(value.shape) != shapes[name]:
                raise ValueError(f"optimizer state {flat!r}: shape {tuple(value.shape)}, expected {shapes[name]}")
            state.setdefault(index[name], {})[key] = torch.from_numpy(np.array(value, dtype=np.float32))
        optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})

    def reset_optimizer(self) -> None:
        self.client.trainer = create_trainer(self.edge.trainer, self.client.model, self.edge)
