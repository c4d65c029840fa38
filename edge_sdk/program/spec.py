"""What determines an edge program, and which trainers have one. Torch-free: the runtime's bookkeeping and
devices use it; :mod:`edge_sdk.program.compile` turns a spec into a program."""
from __future__ import annotations

import dataclasses
import hashlib
import json

COMPILER_VERSION = 1
ONNX_TRAINERS = ("backprop", "fg_weight")
WHY_NOT = {  # trainers the onnxruntime engine does not run, and why (docs/EDGE_RUNTIME.md)
    "fg_local_guess": "its auxiliary heads are created on the first batch and trained beside the model: a "
                      "step is several module-local backward passes plus projections, not one graph yet",
    "forward": "edge.trainer=forward is fg_local_guess with a joint projection (same reason)",
    "async_fgd": "AsyncFGD keeps a pipeline of in-flight batches across steps (module k updates K-1-k steps "
                 "late); a step is not a pure function of (state, batch)",
}


def onnx_trainer_problem(trainer: str) -> str | None:
    """Why ``trainer`` cannot run on the onnxruntime engine (None when it can)."""
    if trainer in ONNX_TRAINERS:
        return None
    return WHY_NOT.get(trainer, f"trainer {trainer!r} has no graph export")


def program_spec(edge, num_classes: int, input_shape, seed: int = 0, torch_version: str = "") -> dict:
    """The inputs of a compile (``edge``: an EdgeConfig); equal specs give equivalent programs."""
    return {"edge": dataclasses.asdict(edge), "num_classes": int(num_classes),
            "input_shape": [int(s) for s in input_shape], "seed": int(seed), "compiler": COMPILER_VERSION,
            "torch": torch_version}


def spec_key(spec: dict) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()
