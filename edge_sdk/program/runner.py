"""Run an edge program with onnxruntime and numpy: a training step, and feature/logit extraction.

Torch-free. The runner owns the model state (parameters and BatchNorm buffers, by ``state_dict`` name)
and the optimizer (:mod:`edge_sdk.program.optim`); graphs are stateless functions of that state and a
batch (see :mod:`edge_sdk.program.compile` for their inputs and outputs).

Forward gradients (``fg_weight``, Baydin et al. 2022): for each of ``tangents`` Gaussian tangents v the
graph returns ∇L·v; the gradient estimate is the mean of (∇L·v)·v, BatchNorm statistics are taken from the
first pass (a batch counts once), and with ``exact_classifier`` the classifier takes its true gradient.
"""
from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass

import numpy as np

from edge_sdk.program.format import EdgeProgram, ProgramError
from edge_sdk.program.optim import NumpyOptimizer


@dataclass
class StepOutcome:
    loss: float
    ce: float
    kd: float
    correct: int
    samples: int


_EMPTY_DIR = os.path.join(tempfile.gettempdir(), "edgefl-no-external-data")


_ARENA: list = []


def _shared_arena(ort) -> None:
    if not _ARENA:
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, ort.OrtArenaCfg(0, 1, -1, -1))  # extend by what is asked
        _ARENA.append(info)


def make_session(graph: bytes, threads: int | None = 1):
    """An onnxruntime CPU session; ``threads`` intra-op threads, no spinning (steadier on shared cores)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(threads or 1)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    # onnxruntime's memory arena stays on: without it a train step ran 2.1x slower for ~40 MB less peak RSS
    # (resnet8_gkt, batch 64: 169 ms against 79 ms; docs/EDGE_RUNTIME.md)
    # no graph of ours has external data; should one slip past check_graph, it finds an empty folder
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", _EMPTY_DIR)
    # one memory arena for the process (train step and extraction take turns): peak is the larger of the two
    # graphs' working sets, not their sum
    _shared_arena(ort)
    options.add_session_config_entry("session.use_env_allocators", "1")
    options.log_severity_level = 3
    return ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])


class ProgramRunner:
    """The state and sessions of one device's edge program. ``tangent_seed`` seeds forward-gradient tangents
    (None: the manifest's ``trainer_options.seed``, else fresh entropy)."""

    def __init__(self, program: EdgeProgram, threads: int | None = 1, tangent_seed: int | None = None):
        m = program.manifest
        self.manifest = m
        self.trainer = m["trainer"]
        self.params = {n: np.array(program.state[n], dtype=np.float32) for n in m["params"]}
        self.buffers = {n: np.array(program.state[n]) for n in m["buffers"]}
        self.trainable = list(m.get("trainable", m["params"]))
        self.optimizer = NumpyOptimizer(m["optimizer"])
        self.sessions = {name: make_session(graph, threads) for name, graph in program.graphs.items()}
        self.inputs = {name: [i.name for i in s.get_inputs()] for name, s in self.sessions.items()}
        self.outputs = {name: m["graphs"][name]["outputs"] for name in program.graphs}
        for name, s in self.sessions.items():
            got = [o.name for o in s.get_outputs()]
            if got != self.outputs[name]:
                raise ProgramError(f"graph {name!r} outputs {got[:4]}..., manifest says {self.outputs[name][:4]}...")
        self.step_batch = m["graphs"]["train_step"].get("batch")
        options = m.get("trainer_options") or {}
        self.tangents = int(options.get("tangents", 1))
        seed = tangent_seed if tangent_seed is not None else options.get("seed")
        self.rng = np.random.default_rng(seed)
        self.perturbed = list(m.get("perturbed", []))

    # -- state --------------------------------------------------------------------------------------

    def model_state(self) -> dict[str, np.ndarray]:
        return {**self.params, **self.buffers}

    def load_model_state(self, state: dict[str, np.ndarray]) -> None:
        """Replace parameters/buffers present in ``state`` (names and shapes checked). Raises ValueError."""
        for name, value in state.items():
            target = self.params if name in self.params else self.buffers if name in self.buffers else None
            if target is None:
                raise ValueError(f"{name!r} is not a tensor of this edge model")
            if tuple(value.shape) != tuple(target[name].shape):
                raise ValueError(f"{name!r}: shape {tuple(value.shape)}, expected {tuple(target[name].shape)}")
            target[name] = np.array(value, dtype=target[name].dtype)

    def _state_feed(self) -> dict[str, np.ndarray]:
        feed = {f"param.{n}": v for n, v in self.params.items()}
        feed.update({f"buffer.{n}": v for n, v in self.buffers.items()})
        return feed

    def _run(self, graph: str, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        wanted = {n: feed[n] for n in self.inputs[graph]}  # the exporter drops inputs a graph does not read
        return dict(zip(self.outputs[graph], self.sessions[graph].run(None, wanted)))

    # -- a training step ----------------------------------------------------------------------------

    def _batch_feed(self, images, labels, teacher, teacher_mask) -> tuple[dict, int]:
        """The batch inputs, padded with ``valid = 0`` rows when the step graph has a fixed batch."""
        n = len(labels)
        k = self.manifest["num_classes"]
        if teacher is None:
            teacher, teacher_mask = np.zeros((n, k), np.float32), np.zeros(n, np.float32)
        feed = {"images": np.ascontiguousarray(images, dtype=np.float32), "labels": labels.astype(np.int64),
                "teacher": np.ascontiguousarray(teacher, dtype=np.float32),
                "teacher_mask": teacher_mask.astype(np.float32), "valid": np.ones(n, np.float32)}
        b = self.step_batch
        if b is not None and n != b:
            if n > b:
                raise ValueError(f"a batch of {n} samples exceeds the step graph's fixed batch of {b}")
            feed = {key: np.concatenate([v, np.zeros((b - n, *v.shape[1:]), v.dtype)]) for key, v in feed.items()}
        return feed, n

    def train_step(self, images: np.ndarray, labels: np.ndarray, teacher: np.ndarray | None = None,
                   teacher_mask: np.ndarray | None = None, tangents: list[dict[str, np.ndarray]] | None = None
                   ) -> StepOutcome:
        """One update on a batch: ``images`` B x C x H x W float32 (normalized), ``labels`` B int64, ``teacher``
        B x K float32 soft labels with ``teacher_mask`` B (1 where present). ``tangents`` (forward gradients
        only, for tests): the tangents to use instead of sampling."""
        feed, n = self._batch_feed(images, labels, teacher, teacher_mask)
        feed.update(self._state_feed())
        if self.trainer == "backprop":
            out = self._run("train_step", feed)
            grads = {n_: out[f"grad.{n_}"] for n_ in self.params}
        else:
            grads, out = self._forward_gradient(feed, tangents)
        for name, g in grads.items():  # a graph's outputs are checked before anything is applied
            if g.shape != self.params[name].shape or not np.isfinite(g).all():
                raise ProgramError(f"the step graph's gradient of {name!r} is {g.dtype}{list(g.shape)}, not finite "
                                   f"{list(self.params[name].shape)}")
        for name, value in self.buffers.items():
            new = out[f"buffer_out.{name}"]
            if new.shape != value.shape or new.dtype != value.dtype:
                raise ProgramError(f"the step graph's {name!r} is {new.dtype}{list(new.shape)}, not "
                                   f"{value.dtype}{list(value.shape)}")
        self.optimizer.step(self.params, grads)
        for name in self.buffers:
            self.buffers[name] = out[f"buffer_out.{name}"]
        correct = int((out["logits"][:n].argmax(1) == labels).sum())
        return StepOutcome(float(out["loss"]), float(out["ce"]), float(out["kd"]), correct, n)

    def _forward_gradient(self, feed, tangents):
        count = len(tangents) if tangents is not None else self.tangents
        estimate = {n: np.zeros_like(self.params[n]) for n in self.perturbed}
        first = None
        for i in range(count):
            v = tangents[i] if tangents is not None else {
                n: self.rng.standard_normal(self.params[n].shape, dtype=np.float32) for n in self.perturbed}
            out = self._run("train_step", {**feed, **{f"tangent.{n}": v[n] for n in self.perturbed}})
            first = first or out
            d = float(out["jvp"]) / count
            for n in self.perturbed:
                estimate[n] += d * v[n]
        grads = dict(estimate)
        grads.update({n[len("grad."):]: first[n] for n in self.outputs["train_step"] if n.startswith("grad.")})
        return grads, first

    # -- extraction ---------------------------------------------------------------------------------

    def extract(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(logits N x K, features N x C x h x w) in eval mode (running statistics)."""
        out = self._run("extract", {**self._state_feed(), "images": np.ascontiguousarray(images, np.float32)})
        return out["logits"], out["features"]
