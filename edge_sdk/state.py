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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors.numpy

from edgefl_core.config import ConfigError

logger = logging.getLogger("edgefl.agent")

MAX_STATE_BYTES = 1 << 30
STATE_FILE = "agent_state.safetensors"   # in the agent's state_dir
OLD_STATE_FILE = "agent_state.pt"        # torch.save states of earlier versions: not read (never unpickled)


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


def read_state_meta(path: Path) -> dict | None:
    """The saved bookkeeping only (the safetensors header's ``agent`` metadata; no tensor is read), or None
    when there is no readable one."""
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= 100_000_000:
                return None
            meta = json.loads(json.loads(f.read(n)).get("__metadata__", {}).get("agent", "null"))
    except Exception:  # unreadable, foreign, non-string or absurdly nested metadata: no saved session
        return None
    return meta if isinstance(meta, dict) else None


class StateMismatch(ConfigError):
    """The state directory holds another device's, run's or data's progress."""


def check_state_identity(path: Path, *, device: str, run: str, data: str) -> None:
    """At start, before anything is trained: the saved state (if any) must be this device's, in this run, on
    this data (``data``: its fingerprint). Raises StateMismatch naming the difference and the remedy; never
    resumes progress made on other data or in another run."""
    old = path.parent / OLD_STATE_FILE
    if old.exists() and not path.exists():
        logger.warning("%s: a state file of an earlier version (torch.save) is not read; this device starts its "
                       "progress afresh (delete the file to silence this)", old)
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


def empty_accepted_mark() -> dict:
    return {"session": None, "round": -1, "splits": []}


@dataclass
class RoundProgress:
    """The round bookkeeping saved with the engine's state; rounds are ints >= -1."""

    last_done: int = -1               # last round whose upload this device finished
    trained_round: int = -1           # last round whose local training finished (its upload may be pending)
    done_session: str | None = None   # the runtime session ``last_done`` was finished for
    # the splits of a round not done yet that the runtime session already accepted: never sent again
    accepted: dict = field(default_factory=empty_accepted_mark)
    soft_label_round: int = -1        # newest round whose soft labels arrived

    def done_already(self, round_: int, session: str | None) -> bool:
        """True when this runtime session already has this device's upload of ``round_``: it accepted it, or a
        later round's (a session announces rounds in order, so an announcement of an earlier one is a repeat:
        a redelivery, a reconnect's retained copy). Only a new session (a restarted runtime, which lost the
        round in progress) is sent a finished round again."""
        return session == self.done_session and round_ <= self.last_done


class AgentStateFile:
    """One device's state file, tagged with its identity: ``device``, ``run`` and ``data`` (the fingerprint of
    its local data). Saves and resumes an engine (:class:`~edge_sdk.engine.EdgeEngine`) with its
    :class:`RoundProgress`; either engine resumes the other's state (portable names)."""

    def __init__(self, path: Path, *, device: str, run: str, data: str):
        self.path, self.device, self.run, self.data = Path(path), device, run, data

    def saved_session(self) -> str | None:
        """The runtime session of the last finished round in this device's saved state (its end is obeyed
        before any engine exists); read from the header only."""
        meta = read_state_meta(self.path) or {}
        mine = meta.get("device") == self.device and meta.get("run") == self.run
        return (meta.get("done_session") or None) if mine else None

    def save(self, engine, progress: RoundProgress, *, recipe: str, instance: str | None,
             program: str | None) -> None:
        """Atomic (:func:`write_state`). ``recipe``: the run recipe as JSON; ``program``: the edge program's
        digest (onnxruntime)."""
        write_state(self.path, meta={
            "soft_round": engine.soft_labels.round, "last_done": progress.last_done,
            "trained_round": progress.trained_round, "done_session": progress.done_session or "",
            "device": self.device, "run": self.run, "recipe": recipe, "data": self.data, "instance": instance or "",
            "accepted": json.dumps(progress.accepted), "engine": engine.name, "program": program or ""},
            model=engine.model_state(), optimizer=engine.optimizer_state(), soft_logits=engine.soft_labels.logits,
            soft_present=engine.soft_labels.present)

    def resume(self, engine, *, recipe: str, instance: str | None) -> RoundProgress | None:
        """Load the saved state into ``engine`` when it is this device's, run's (``instance``) and ``recipe``'s
        and fits the engine's model and samples; returns its progress. None (with a warning naming why) when it
        cannot be resumed: a state that does not fit costs progress, never the daemon."""
        state = read_state(self.path)
        if state is None:
            return None
        problem = state_problem(state, device=self.device, run=self.run, recipe=recipe,
                                model={k: v.shape for k, v in engine.model_state().items()},
                                soft_shape=engine.soft_labels.logits.shape, instance=instance)
        if problem is None:
            try:
                engine.load_optimizer_state(state["optimizer"])
            except (KeyError, ValueError, TypeError) as e:
                problem = f"its optimizer state does not fit ({e})"
        if problem is not None:
            logger.warning("%s: ignoring the saved state: %s", self.path, problem)
            return None
        engine.load_model_state(state["model"])
        engine.soft_labels.load(state["soft_logits"], state["soft_present"], int(state["soft_round"]))
        progress = RoundProgress(last_done=int(state["last_done"]), done_session=state["done_session"] or None,
                                 trained_round=int(state.get("trained_round", state["last_done"])),
                                 accepted=accepted_mark(state.get("accepted")),
                                 soft_label_round=int(state["soft_round"]))
        saved_by = state.get("engine")
        logger.info("%s resumed from %s%s: last finished round %d", self.device, self.path,
                    f" (saved by the {saved_by} engine)" if saved_by not in (None, engine.name) else "",
                    progress.last_done)
        return progress


def accepted_mark(raw) -> dict:
    """The saved ``accepted`` mark (JSON: the splits of an unfinished round that a runtime session already
    accepted), checked field by field; an unreadable one is an empty mark (the device then re-sends splits the
    runtime may already hold: costs bytes, never data)."""
    try:
        mark = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return empty_accepted_mark()
    if not isinstance(mark, dict) or not isinstance(mark.get("session"), (str, type(None))) \
            or type(mark.get("round")) is not int or not isinstance(mark.get("splits"), list) \
            or not all(s in ("train", "test") for s in mark["splits"]):
        return empty_accepted_mark()
    return {"session": mark["session"], "round": mark["round"], "splits": list(mark["splits"])}
