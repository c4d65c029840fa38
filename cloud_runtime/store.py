"""Durable runtime state: generations of model files, each committed by its own state file.

A commit writes ``<key>.<g>.pt`` for every model, then ``runtime.<g>.json`` (the run's state, naming each
model file with its size and sha256), then ``runtime.json`` (the same state: the newest commit). Every
file is written to a temporary name and renamed, so a crash or a full disk leaves whole files only.
The previous generation is kept until the next one is committed, so a checkpoint damaged later (a
truncated or altered file) is detected on load by its sha256 and the restore falls back to the newest
generation that verifies, naming what it skipped. Model files hold tensors and plain containers only
and load with ``weights_only=True``: a tampered checkpoint is refused, never executed.
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from cloud_runtime.config import RuntimeConfig

from cloud_runtime.plots import jsonable

RUNTIME_STATE = "runtime.json"
KEEP_GENERATIONS = 2

logger = logging.getLogger("edgefl.runtime")


class CheckpointError(RuntimeError):
    """No committed generation in the state directory can be used (each file and why is in the message)."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class DurableStore:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.generation = 0
        self.files: dict[str, str] = {}   # key -> file name, as the committed state names them
        self.skipped: list[str] = []      # what the last load could not use, and why

    # -- loading ------------------------------------------------------------------------------------

    def _candidates(self) -> list[Path]:
        """State files, newest first: ``runtime.json``, then ``runtime.<g>.json`` by generation."""
        numbered = []
        for path in self.dir.glob("runtime.*.json"):
            match = _NUMBERED.fullmatch(path.name)
            if match:
                numbered.append((int(match.group(1)), path))
        return [self.dir / RUNTIME_STATE] + [p for _, p in sorted(numbered, reverse=True)]

    def _verify(self, path: Path) -> dict:
        """The state in ``path`` if it and every model file it names are whole; else ValueError saying why."""
        try:
            state = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ValueError(f"unreadable ({type(e).__name__}: {str(e)[:120]})") from None
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        files = state.get("model_files", {})
        if not isinstance(files, dict):
            raise ValueError("model_files is not an object")
        problem = _schema_problem(state)
        if problem:
            raise ValueError(problem)
        checks = state.get("model_checks")
        if checks is not None and not isinstance(checks, dict):
            raise ValueError("model_checks is not an object")
        for key, name in files.items():
            model = self.dir / Path(str(name)).name
            if not model.is_file():
                raise ValueError(f"names {model.name}, which is missing (or not a file)")
            check = checks.get(key) if checks is not None else None
            if checks is not None and not isinstance(check, dict):
                raise ValueError(f"no size and sha256 committed for {model.name}")
            if check is None:
                logger.warning("%s: %s has no committed sha256 (state written before checks existed): unverified",
                               path, model.name)
            else:
                if model.stat().st_size != check.get("bytes"):
                    raise ValueError(f"{model.name} has {model.stat().st_size} bytes, {check.get('bytes')} were "
                                     "committed (truncated?)")
                if _sha256(model) != check.get("sha256"):
                    raise ValueError(f"{model.name} fails its sha256 (altered or damaged)")
        return state

    def load(self) -> dict | None:
        """The newest committed state whose files verify (None on a fresh start); remembers its model files.

        Raises CheckpointError when state files exist but none verifies (starting over silently would
        throw the run's work away: the message names every file and why; move the directory to start fresh)."""
        candidates = [p for p in self._candidates() if p.exists()]
        if not candidates:
            return None
        self.skipped = []
        for path in candidates:
            try:
                state = self._verify(path)
            except ValueError as e:
                self.skipped.append(f"{path}: {e}")
                logger.error("checkpoint %s cannot be used: %s; trying an older generation", path, e)
                continue
            self.generation = int(state.get("generation", 0)) if type(state.get("generation")) is int else 0
            self.files = {k: Path(v).name for k, v in state.get("model_files", {}).items() if isinstance(v, str)}
            for legacy, key in (("server_checkpoint", "server"), ("global_checkpoint", "global_model")):
                if isinstance(state.get(legacy), str):  # state written before model_files existed
                    self.files.setdefault(key, Path(state[legacy]).name)
            if self.skipped:
                logger.warning("resuming from %s (generation %d)", path, self.generation)
                # the next commit takes a number no damaged file holds (they stay for inspection until dropped)
                seen = [int(m.group(1)) for p in self.dir.iterdir() if (m := _GENERATION.fullmatch(p.name))]
                self.generation = max([self.generation, *seen])
            return state
        raise CheckpointError(f"no usable checkpoint in {self.dir}: " + "; ".join(self.skipped)
                              + f". Move {self.dir} away to start the run over.")

    def load_model(self, key: str) -> dict | None:
        """The committed state dict for ``key`` (None when there is none); refuses pickled code.
        Raises CheckpointError naming the file when it cannot be read."""
        name = self.files.get(key)
        path = self.dir / Path(name).name if name else None
        if path is None or not path.exists():
            return None
        try:
            return torch.load(path, weights_only=True, map_location="cpu")
        except Exception as e:  # truncated zip, tampered pickle, ...
            raise CheckpointError(f"{path}: {type(e).__name__}: {str(e)[:200]}") from None

    # -- committing -----------------------------------------------------------------------------------

    def free_bytes(self) -> int:
        self.dir.mkdir(parents=True, exist_ok=True)
        return shutil.disk_usage(self.dir).free

    def commit(self, models: dict[str, torch.nn.Module], state: dict) -> None:
        """Write generation g+1 (models, ``runtime.<g>.json``, ``runtime.json``); then drop generations older
        than the previous one. Raises OSError (e.g. ENOSPC) with nothing committed and nothing deleted."""
        self.dir.mkdir(parents=True, exist_ok=True)
        generation = self.generation + 1
        files, checks, written = {}, {}, []
        try:
            for key, module in models.items():
                name = f"{key}.{generation}.pt"
                buffer = io.BytesIO()  # serialized in memory: torch.save on a full disk raises a bare RuntimeError
                torch.save(module.state_dict(), buffer)
                data = buffer.getvalue()
                _write_atomic(self.dir / name, data)  # plain file writes: a full disk is an OSError (ENOSPC)
                written.append(self.dir / name)
                files[key] = name
                checks[key] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
            payload = json.dumps(jsonable({"generation": generation, "model_files": files, "model_checks": checks,
                                           **state}), indent=1).encode()
            numbered = self.dir / f"runtime.{generation}.json"
            _write_atomic(numbered, payload)
            written.append(numbered)
            _write_atomic(self.dir / RUNTIME_STATE, payload)  # the commit point
        except BaseException:
            for path in written:
                path.unlink(missing_ok=True)
            for tmp in self.dir.glob("*.tmp"):
                tmp.unlink(missing_ok=True)
            raise
        self.generation, self.files = generation, files
        self._drop_old(generation - KEEP_GENERATIONS + 1)

    def _drop_old(self, oldest_kept: int) -> None:
        """Delete generations older than ``oldest_kept`` (best effort: the commit is already done)."""
        for path in list(self.dir.glob("*.pt")) + list(self.dir.glob("runtime.*.json")):
            match = _GENERATION.fullmatch(path.name)
            if match and int(match.group(1)) < oldest_kept and path.is_file():
                try:
                    path.unlink()
                except OSError as e:
                    logger.warning("could not delete old checkpoint %s: %s", path, e)


_NUMBERED = re.compile(r"runtime\.([0-9]{1,12})\.json")
_GENERATION = re.compile(r"[A-Za-z_]+\.([0-9]{1,12})\.(?:pt|json)")


def _schema_problem(state: dict) -> str | None:
    """What a state file holds that restoring would trip over (None when its shape is right)."""
    typed = {"generation": int, "next_round": int, "rows": list, "devices": dict, "rejections": dict,
             "device_ids": dict, "device_round": dict, "server_version": int}
    for key, kind in typed.items():
        if key in state and (not isinstance(state[key], kind) or isinstance(state[key], bool)):
            return f"{key} is not {'an' if kind is int else 'a'} {kind.__name__}"
    if state.get("num_classes") is not None and (type(state.get("num_classes")) is not int
                                                 or type(state.get("feature_channels")) is not int):
        return "num_classes and feature_channels must both be integers"
    if any(not isinstance(v, dict) for v in state.get("devices", {}).values()):
        return "devices holds a non-object"
    if any(not isinstance(v, dict) or any(not isinstance(ids, list) for ids in v.values())
           for v in state.get("device_ids", {}).values()):
        return "device_ids must map devices to splits to id lists"
    return None


# -- what a state belongs to ---------------------------------------------------------------


def run_definition(cfg: RuntimeConfig) -> dict:
    """The settings that make a run this run: resuming state made under others would mix two runs (a
    change of rounds, epochs or learning rates is a change within a run and is allowed)."""
    return {"algorithm": cfg.algorithm, "mode": cfg.mode, "edge_model": cfg.edge.model,
            "edge_model_kwargs": cfg.edge.model_kwargs, "server_model": cfg.server.model,
            "server_model_kwargs": cfg.server.model_kwargs, "num_classes": cfg.num_classes,
            "input_shape": cfg.input_shape, "codec": cfg.codec,
            "privacy": asdict(cfg.recipe_for().privacy)}  # with epsilon, σ depends on rounds: a change is a new run


def identity_problem(saved, current: dict) -> str | None:
    """Why state saved under identity ``saved`` is not this run's (None when it is). State from before
    identities were recorded carries none and is taken as this run's."""
    if saved is None:
        return None
    if (not isinstance(saved, dict) or not isinstance(saved.get("instance"), str) or not saved["instance"]
            or not isinstance(saved.get("definition", {}), dict)):
        return "state with an unreadable identity (not made by this version: move it aside)"
    if saved.get("run_id") != current["run_id"]:
        return f"the state of run {saved.get('run_id')!r}, and this config is run {current['run_id']!r}"
    old, new = saved.get("definition") or {}, current["definition"]
    changed = [f"{k} {old.get(k)!r} -> {new[k]!r}" for k in new if k in old and old[k] != new[k]]
    if changed:
        return f"run {current['run_id']!r} made with other settings ({'; '.join(changed)})"
    return None
