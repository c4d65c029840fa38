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

from edgefl_core.config import ConfigError

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


def state_problem(state: dict, *, device: str, run: str, recipe: str, model: torch.nn.Module,
                  soft_logits: torch.Tensor, instance: str | None = None) -> str | None:
    """Why ``state`` cannot be resumed by this device, run, recipe (as JSON), model and data, in the
    runtime's run ``instance`` (None: unknown); None if it can."""
    if state.get("device") != device or state.get("run") != run:
        return f"it is the state of device {state.get('device')!r} in run {state.get('run')!r}"
    if instance and state.get("instance") and state.get("instance") != instance:
        return (f"the runtime started run {run!r} afresh (instance {instance}; this state is from instance "
                f"{state.get('instance')})")
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
    present = state.get("soft_present")
    if not isinstance(present, torch.Tensor) or tuple(present.shape) != (soft_logits.shape[0],):
        return "its soft-label mask does not fit this device's samples"
    for key in ("soft_round", "last_done", "trained_round"):
        if key in state and (type(state[key]) is not int or not -1 <= state[key] < 2**31):
            return f"its {key} is not a round number"
    if not isinstance(state.get("done_session"), str):
        return "its done_session is not a session id"
    return None
