"""The agent's durable state: one ``torch.save`` file, written atomically, read defensively.

What a state holds: the model, the trainer's (optimizer's) state, the soft labels, and the round
bookkeeping (``last_done``, ``trained_round``, ``done_session``), tagged with device, run and the run
recipe so a state of anything else is never resumed.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

logger = logging.getLogger("edgefl.agent")


def write_state(path: Path, state: dict) -> None:
    """Atomic: a crash leaves the old or the new state, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def read_state(path: Path) -> dict | None:
    """The saved state, or None (with a warning naming the file) when there is none or it cannot be read:
    a damaged state file costs the device its progress, never the daemon."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, weights_only=True)  # no pickle execution
    except Exception as e:  # truncated zip, foreign pickle, ...
        logger.warning("%s: ignoring an unreadable state file (%s: %s)", path, type(e).__name__, str(e)[:200])
        return None
    if not isinstance(state, dict):
        logger.warning("%s: ignoring a state file that holds a %s", path, type(state).__name__)
        return None
    return state


def state_problem(state: dict, *, device: str, run: str, recipe: str, model: torch.nn.Module,
                  soft_logits: torch.Tensor) -> str | None:
    """Why ``state`` cannot be resumed by this device, run, recipe (as JSON), model and data; None if it can."""
    if state.get("device") != device or state.get("run") != run:
        return f"it is the state of device {state.get('device')!r} in run {state.get('run')!r}"
    if state.get("recipe") != recipe:
        return "it was saved under another run recipe (model, trainer or codecs changed)"
    saved_logits = state.get("soft_logits")
    if not isinstance(saved_logits, torch.Tensor) or tuple(saved_logits.shape) != tuple(soft_logits.shape):
        return (f"it was saved for {getattr(saved_logits, 'shape', ['?'])[0]} local samples; this device now has "
                f"{soft_logits.shape[0]}")
    saved, current = state.get("model"), model.state_dict()
    if not isinstance(saved, dict) or set(saved) != set(current) or any(
            tuple(saved[k].shape) != tuple(v.shape) for k, v in current.items()):
        return "it was saved for a model of other shapes (the data's channels or classes changed)"
    for key in ("soft_present", "soft_round", "last_done", "done_session", "trainer"):
        if key not in state:
            return f"it lacks {key!r}"
    return None
