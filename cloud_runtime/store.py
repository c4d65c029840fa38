"""Durable runtime state: generation-named model files committed by ``runtime.json``.

Model files are written first under new names, then ``runtime.json`` naming them: ``runtime.json`` is
the commit point, so a crash anywhere leaves a consistent (model, round) pair and nothing is trained
on twice. Model files hold tensors and plain containers only and load with ``weights_only=True``:
a tampered checkpoint is refused, never executed.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from cloud_runtime.plots import write_json

RUNTIME_STATE = "runtime.json"


class DurableStore:
    def __init__(self, state_dir: str | Path):
        self.dir = Path(state_dir)
        self.generation = 0
        self.files: dict[str, str] = {}   # key -> file name, as the committed runtime.json names them

    def load(self) -> dict | None:
        """The committed state (None on a fresh start); remembers which model files it names."""
        path = self.dir / RUNTIME_STATE
        if not path.exists():
            return None
        state = json.loads(path.read_text())
        self.generation = int(state.get("generation", 0))
        self.files = {k: v for k, v in state.get("model_files", {}).items() if isinstance(v, str)}
        for legacy, key in (("server_checkpoint", "server"), ("global_checkpoint", "global_model")):
            if isinstance(state.get(legacy), str):  # state written before model_files existed
                self.files.setdefault(key, state[legacy])
        return state

    def load_model(self, key: str) -> dict | None:
        """The committed state dict for ``key`` (None when there is none); refuses pickled code."""
        name = self.files.get(key)
        path = self.dir / Path(name).name if name else None
        if path is None or not path.exists():
            return None
        return torch.load(path, weights_only=True, map_location="cpu")

    def commit(self, models: dict[str, torch.nn.Module], state: dict) -> None:
        """Write ``models`` (key -> module) as ``<key>.<generation>.pt``, then ``runtime.json``; drop stale files."""
        self.dir.mkdir(parents=True, exist_ok=True)
        generation = self.generation + 1
        files = {}
        for key, module in models.items():
            name = f"{key}.{generation}.pt"
            tmp = self.dir / (name + ".tmp")
            torch.save(module.state_dict(), tmp)
            os.replace(tmp, self.dir / name)
            files[key] = name
        write_json(self.dir / RUNTIME_STATE, {"generation": generation, "model_files": files, **state})
        self.generation, self.files = generation, files
        for stale in self.dir.glob("*.pt"):
            if stale.name not in files.values():
                stale.unlink(missing_ok=True)
