"""The agent's durable state: one safetensors file, written atomically, read defensively.

Both engines read and write it (a device can switch between torch and onnxruntime without losing its
model, optimizer or soft labels). Tensors: ``model.<state_dict name>``, ``optim.<param>.<key>`` (the portable
optimizer state, :meth:`edge_sdk.engine.EdgeEngine.optimizer_state`), ``soft.logits`` (N x K float32) and
``soft.present`` (N uint8). Metadata ``agent`` (JSON): the round bookkeeping (``last_done``,
``trained_round``, ``done_session``, ``soft_round``, ``accepted``) tagged with device, run, run instance, run
recipe and data fingerprint, so a state of anything else is never resumed. Nothing is unpickled.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import safetensors.numpy

from edgefl_core.config import ConfigError

logger = logging.getLogger("edgefl.agent")

MAX_STATE_BYTES = 1 << 30


def write_state(path: Path, *, meta: dict, model: dict[str, np.ndarray], optimizer: dict[str, np.ndarray],
                soft_logits: np.ndarray, soft_present: np.ndarray) -> None:
    """Atomic: a crash leaves the old or the new state, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"model.{k}": np.asarray(v, order="C") for k, v in model.items()}  # (ascontiguousarray makes 0-d 1-d)
    tensors.update({f"optim.{k}": np.asarray(v, order="C") for k, v in optimizer.items()})
    tensors["soft.logits"] = np.ascontiguousarray(soft_logits, dtype=np.float32)
    tensors["soft.present"] = np.ascontiguousarray(soft_present, dtype=np.uint8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(safetensors.numpy.save(tensors, metadata={"agent": json.dumps(meta, sort_keys=True)}))
        f.flush()
        os.fsync(f.fileno())  # power loss on an SD card: the old state or the whole new one
    os.replace(tmp, path)


def read_state(path: Path) -> dict | None:
    """The saved state as ``{**bookkeeping, "model": {...}, "optimizer": {...}, "soft_logits", "soft_present"}``,
    or None (with a warning naming the file) when there is none or it cannot be read: a damaged state file
    costs the device its progress, never the daemon."""
    if not path.exists():
        return None
    try:
        if path.stat().st_size > MAX_STATE_BYTES:
            raise ValueError(f"larger than {MAX_STATE_BYTES} bytes")
        blob = path.read_bytes()
        tensors = safetensors.numpy.load(blob)
        n = int.from_bytes(blob[:8], "little")
        meta = json.loads(json.loads(blob[8:8 + n]).get("__metadata__", {}).get("agent", "null"))
    except Exception as e:  # truncated file, foreign format, bad JSON
        logger.warning("%s: ignoring an unreadable state file (%s: %s)", path, type(e).__name__, str(e)[:200])
        return None
    if not isinstance(meta, dict):
        logger.warning("%s: ignoring a state file without the agent's bookkeeping", path)
        return None
    state = dict(meta)
    state["model"] = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    state["optimizer"] = {k[6:]: v for k, v in tensors.items() if k.startswith("optim.")}
    state["soft_logits"] = tensors.get("soft.logits")
    present = tensors.get("soft.present")
    state["soft_present"] = present.astype(bool) if present is not None else None
    return state


class StateMismatch(ConfigError):
    """The state directory holds another device's, run's or data's progress."""


def check_state_identity(path: Path, *, device: str, run: str, data: str) -> None:
    """At start, before anything is trained: the saved state (if any) must be this device's, in this run, on
    this data (``data``: its fingerprint). Raises StateMismatch naming the difference and the remedy; never
    resumes progress made on other data or in another run."""
    state = read_state(path)
    if state is None:
        return
    saved_data = state.get("data")
    if state.get("device") != device or state.get("run") != run:
        problem = f"the state of device {state.get('device')!r} in run {state.get('run')!r}, not {device!r} in {run!r}"
    elif saved_data is not None and saved_data != data:
        problem = (f"progress made on other data (fingerprint {saved_data}; this device's data is now {data}: "
                   "data.path, data.ids_file or the files changed)")
    else:
        return
    raise StateMismatch(f"{path} holds {problem}. Start afresh with 'edge-agent --config ... --reset-state' "
                        "(moves the state aside) or set another state_dir; to resume, restore the data or config "
                        "it was made with")


def state_problem(state: dict, *, device: str, run: str, recipe: str, model: dict[str, tuple],
                  soft_shape: tuple[int, int], instance: str | None = None) -> str | None:
    """Why ``state`` cannot be resumed by this device, run, recipe (as JSON), model (name -> shape) and
    soft-label store (N x K), in the runtime's run ``instance`` (None: unknown); None if it can."""
    if state.get("device") != device or state.get("run") != run:
        return f"it is the state of device {state.get('device')!r} in run {state.get('run')!r}"
    if instance and state.get("instance") and state.get("instance") != instance:
        return (f"the runtime started run {run!r} afresh (instance {instance}; this state is from instance "
                f"{state.get('instance')})")
    if state.get("recipe") != recipe:
        return "it was saved under another run recipe (model, trainer or codecs changed)"
    saved_logits = state.get("soft_logits")
    if not isinstance(saved_logits, np.ndarray) or tuple(saved_logits.shape) != tuple(soft_shape):
        return (f"it was saved for {getattr(saved_logits, 'shape', ['?'])[0]} local samples; this device now has "
                f"{soft_shape[0]}")
    saved = state.get("model")
    if not isinstance(saved, dict) or set(saved) != set(model) or any(
            tuple(saved[k].shape) != tuple(shape) for k, shape in model.items()):
        return "it was saved for a model of other shapes (the data's channels or classes changed)"
    for key in ("soft_present", "soft_round", "last_done", "done_session", "optimizer"):
        if key not in state:
            return f"it lacks {key!r}"
    present = state.get("soft_present")
    if not isinstance(present, np.ndarray) or tuple(present.shape) != (soft_shape[0],):
        return "its soft-label mask does not fit this device's samples"
    for what, arrays in (("model", saved), ("optimizer state", state.get("optimizer") or {}),
                         ("soft labels", {"logits": saved_logits})):
        if not isinstance(arrays, dict):
            return f"its {what} is not a set of tensors"
        for name, value in arrays.items():
            if np.issubdtype(value.dtype, np.floating) and not np.isfinite(value).all():
                return f"its {what} {name!r} holds NaN or Inf"
            if name.endswith(".step") and (value.size != 1 or float(value.reshape(-1)[0]) < 0
                                          or float(value.reshape(-1)[0]) % 1):
                return f"its optimizer state {name!r} is not a step count"
    for key in ("soft_round", "last_done", "trained_round"):
        if key in state and (type(state[key]) is not int or not -1 <= state[key] < 2**31):
            return f"its {key} is not a round number"
    if not isinstance(state.get("done_session"), str):
        return "its done_session is not a session id"
    return None
