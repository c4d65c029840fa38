"""SGD and Adam in numpy, step for step what ``torch.optim.SGD`` / ``torch.optim.Adam`` compute.

The onnxruntime engine keeps the optimizer outside the graphs so one train-step graph serves every
optimizer setting. State names are the portable ones both engines save (``edge_sdk.state``):
``momentum_buffer`` (SGD), ``exp_avg``, ``exp_avg_sq``, ``step`` (Adam), per parameter name.

SGD (momentum μ, dampening 0, no Nesterov): g ← g + λp; b ← g on the first step, else μb + g; p ← p − η b.
Adam (Kingma & Ba 2015, torch's L2 form): g ← g + λp; m ← β₁m + (1−β₁)g; v ← β₂v + (1−β₂)g²;
p ← p − η/(1−β₁ᵗ) · m / (√v / √(1−β₂ᵗ) + ε).
"""
from __future__ import annotations

import math

import numpy as np


class NumpyOptimizer:
    """``settings``: {name: sgd|adam, lr, momentum, weight_decay, betas, eps} (an edge program's manifest)."""

    def __init__(self, settings: dict):
        self.name = settings["name"]
        if self.name not in ("sgd", "adam"):
            raise ValueError(f"unknown optimizer {self.name!r}; known: sgd, adam")
        self.lr = float(settings["lr"])
        self.momentum = float(settings.get("momentum", 0.0))
        self.weight_decay = float(settings.get("weight_decay", 0.0))
        self.betas = tuple(float(b) for b in settings.get("betas", (0.9, 0.999)))
        self.eps = float(settings.get("eps", 1e-8))
        self.state: dict[str, dict[str, np.ndarray]] = {}

    def step(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Update ``params[name]`` in place for every name in ``grads`` (float32 arrays of the same shape)."""
        for name, g in grads.items():
            p = params[name]
            g = g.astype(np.float32, copy=True)
            if self.weight_decay:
                g += self.weight_decay * p
            st = self.state.setdefault(name, {})
            if self.name == "sgd":
                if self.momentum:
                    buf = st.get("momentum_buffer")
                    if buf is None:
                        st["momentum_buffer"] = buf = g.copy()
                    else:
                        buf *= self.momentum
                        buf += g
                    g = buf
                p -= np.float32(self.lr) * g
                continue
            b1, b2 = self.betas
            if "step" not in st:
                st["step"] = np.zeros((), np.float32)
                st["exp_avg"] = np.zeros_like(p)
                st["exp_avg_sq"] = np.zeros_like(p)
            st["step"] = st["step"] + np.float32(1)
            t = float(st["step"])
            m, v = st["exp_avg"], st["exp_avg_sq"]
            m *= b1
            m += (1 - b1) * g
            v *= b2
            v += (1 - b2) * g * g
            step_size = self.lr / (1 - b1 ** t)
            denom = np.sqrt(v) / math.sqrt(1 - b2 ** t) + self.eps
            p -= (step_size * m / denom).astype(np.float32)

    def state_arrays(self) -> dict[str, np.ndarray]:
        """``{"<param>.<key>": array}`` (the portable optimizer state)."""
        return {f"{name}.{key}": value for name, st in self.state.items() for key, value in st.items()}

    def load_state_arrays(self, arrays: dict[str, np.ndarray], shapes: dict[str, tuple]) -> None:
        """Inverse of :meth:`state_arrays`; names and shapes must be this model's. Raises ValueError."""
        state: dict[str, dict[str, np.ndarray]] = {}
        keys = {"sgd": ("momentum_buffer",), "adam": ("step", "exp_avg", "exp_avg_sq")}[self.name]
        for flat, value in arrays.items():
            name, _, key = flat.rpartition(".")
            if name not in shapes or key not in keys:
                raise ValueError(f"optimizer state {flat!r} is not {self.name}'s for this model")
            expected = () if key == "step" else tuple(shapes[name])
            if tuple(value.shape) != expected:
                raise ValueError(f"optimizer state {flat!r} has shape {tuple(value.shape)}, expected {expected}")
            if not np.isfinite(value).all() or (key == "step" and (float(value) < 0 or float(value) % 1)):
                raise ValueError(f"optimizer state {flat!r} is not finite (or not a step count)")
            state.setdefault(name, {})[key] = np.array(value, dtype=np.float32)
        self.state = state
