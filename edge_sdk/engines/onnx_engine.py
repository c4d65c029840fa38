"""The onnxruntime engine: the runtime's compiled edge program, run with onnxruntime and numpy (no torch).

Data, augmentation, batching, soft labels and the optimizer are numpy; the train step and extraction
are the program's ONNX graphs (:mod:`edge_sdk.program`). The model's initial state comes with the program,
so a device never needs model code: changing the edge model needs no device update.
"""
from __future__ import annotations

import time

import numpy as np

from edge_sdk.data.np_loader import NumpyLoader
from edge_sdk.engine import EdgeEngine, RoundStats, round_stats
from edge_sdk.program.format import EdgeProgram, ProgramError
from edge_sdk.program.optim import NumpyOptimizer
from edge_sdk.program.runner import ProgramRunner
from edge_sdk.soft_labels import SoftLabelStore
from edgefl_core.codecs import UploadArrays
from edgefl_core.data.datasets import ImageDataset


class OnnxEngine(EdgeEngine):
    name = "onnxruntime"

    def __init__(self, device: str, program: EdgeProgram, train: ImageDataset, test: ImageDataset | None, *,
                 stats_name: str | None, seed: int, threads: int | None, extract_batch: int = 128):
        m = program.manifest
        if list(m["input_shape"]) != list(train.image_shape) or m["num_classes"] != train.num_classes:
            raise ProgramError(f"the edge program is for {m['num_classes']} classes of {m['input_shape']} images; "
                               f"this device has {train.num_classes} of {list(train.image_shape)}")
        self.device, self.program = device, program
        # forward-gradient tangents: the recipe's trainer_kwargs.seed when it sets one, else this device's seed
        options_seed = (m.get("trainer_options") or {}).get("seed")
        self.runner = ProgramRunner(program, threads=threads, tangent_seed=seed if options_seed is None else options_seed)
        self.train_set, self.test_set = train, test
        edge = m.get("edge") or {}
        augment = edge.get("augment") or {}
        self.epochs = int(edge.get("epochs", 1))
        self.batch_size = int(m["batch_size"])
        self.loader = NumpyLoader(train, self.batch_size, shuffle=True, crop_padding=int(augment.get("crop_padding", 0)),
                                  hflip=bool(augment.get("hflip", False)), stats_name=stats_name, seed=seed)
        self.stats_name, self.extract_batch = stats_name, extract_batch
        self.soft_labels = SoftLabelStore(train.sample_ids, train.num_classes)
        self.feature_channels = int(m["feature_shape"][0]) if m.get("feature_shape") else None
        self.trainable_params = int(sum(self.runner.params[n].size for n in self.runner.trainable))

    def train_round(self, round_: int) -> RoundStats:
        totals = np.zeros(4)
        samples, start = 0, time.perf_counter()
        for _ in range(self.epochs):
            for batch in self.loader:
                teacher, present = self.soft_labels.lookup(batch.sample_ids)
                if not present.any():
                    teacher = present = None
                result = self.runner.train_step(batch.images, batch.labels, teacher,
                                                None if present is None else present.astype(np.float32))
                totals += (result.loss * result.samples, result.ce * result.samples, result.kd * result.samples,
                           result.correct)
                samples += result.samples
        return round_stats(totals, samples, time.perf_counter() - start,
                           len(self.soft_labels) / max(len(self.train_set), 1))

    def extract(self, split: str, round_: int) -> UploadArrays:
        dataset = self.train_set if split == "train" else self.test_set
        if dataset is None:
            raise ValueError(f"device {self.device} has no {split} data")
        logits = features = None
        start = 0
        for batch in NumpyLoader(dataset, self.extract_batch, stats_name=self.stats_name):
            batch_logits, batch_features = self.runner.extract(batch.images)
            if features is None:  # filled in place: the features are held once, not as batches plus a copy
                features = np.empty((len(dataset), *batch_features.shape[1:]), np.float32)
                logits = np.empty((len(dataset), batch_logits.shape[1]), np.float32)
            end = start + len(batch_logits)
            features[start:end], logits[start:end] = batch_features, batch_logits
            start = end
        return UploadArrays(split, dataset.sample_ids.copy(), features, logits, dataset.labels.astype(np.int64), {})

    def model_state(self) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self.runner.model_state().items()}

    def load_model_state(self, state: dict[str, np.ndarray]) -> None:
        self.runner.load_model_state(state)

    def optimizer_state(self) -> dict[str, np.ndarray]:
        return self.runner.optimizer.state_arrays()

    def load_optimizer_state(self, arrays: dict[str, np.ndarray]) -> None:
        if any(k.startswith("trainer.") for k in arrays):
            raise ValueError("the saved trainer state is one only the torch engine runs")
        self.runner.optimizer.load_state_arrays(arrays, {n: v.shape for n, v in self.runner.params.items()})

    def reset_optimizer(self) -> None:
        self.runner.optimizer = NumpyOptimizer(self.program.manifest["optimizer"])
