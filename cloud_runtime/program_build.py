"""Compile an edge program in a fresh process, into the runtime's program cache.

Shared by the runtime (devices on ``engine: onnxruntime`` register: :mod:`cloud_runtime.edge_programs`),
``cloud-runtime program build`` (offline delivery to air-gapped fleets: the operator builds the program of a
runtime config ahead of time, copies the file to each device and runs ``edge-agent program install``) and
``device-profile --engine onnxruntime``. A program is cached under ``<state_dir>/edge_programs/<spec
key>.edgeprog`` (:func:`edge_sdk.program.spec.spec_key` of :func:`run_program_spec`), so a runtime started
with the same config finds the file, announces its digest and compiles nothing.

The compile runs in its own process (``python -m edge_sdk.program.compile``): the export patches torch
globally and a failed forward-mode trace poisons later ones.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from edge_sdk.program.format import program_digest
from edge_sdk.program.spec import onnx_trainer_problem, program_spec, spec_key
from edgefl_core.config import ConfigError

COMPILE_TIMEOUT_S = 1800
CACHE_DIR = "edge_programs"   # under the runtime's state_dir
SUFFIX = ".edgeprog"


class CompileError(RuntimeError):
    """The compiler process failed (its last line of stderr) or ran past its time."""


def torch_version() -> str:
    import torch  # the compiler's version is part of what a program is
    return torch.__version__


def cached_program_path(state_dir: str | Path, spec: dict) -> Path:
    """Where the runtime of ``state_dir`` keeps (and looks for) the program of ``spec``."""
    return Path(state_dir) / CACHE_DIR / f"{spec_key(spec)}{SUFFIX}"


def run_program_spec(cfg, device: str | None = None) -> dict:
    """The spec of the program a runtime with config ``cfg`` (a RuntimeConfig) compiles for ``device``'s
    recipe, exactly as :class:`cloud_runtime.edge_programs.EdgePrograms` computes it (``cfg.seed``, this
    process's torch version). Raises ConfigError when the run's data is not configured or the recipe's
    trainer has no graph."""
    missing = [k for k in ("num_classes", "input_shape") if getattr(cfg, k) is None]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} must be set in the runtime config to build an edge program "
                          f"ahead of time (e.g. num_classes: 10, input_shape: [1, 28, 28]): the program is compiled "
                          f"for the run's classes and image shape")
    edge = cfg.recipe_for(device).edge
    problem = onnx_trainer_problem(edge.trainer)
    if problem:
        where = f"edge_overrides.{device}.trainer" if device and "trainer" in (cfg.edge_overrides.get(device) or {}) \
            else "edge.trainer"
        raise ConfigError(f"{where}={edge.trainer}: the onnxruntime engine cannot run it ({problem}); use "
                          "backprop or fg_weight, or run those devices on engine torch")
    return program_spec(edge, cfg.num_classes, cfg.input_shape, cfg.seed, torch_version())


def compile_spec(spec: dict, path: str | Path, timeout_s: float = COMPILE_TIMEOUT_S) -> tuple[bytes, float]:
    """Compile ``spec`` in a fresh process and write the program to ``path`` (atomically: a reader never sees
    half a file). Returns (blob, seconds). Raises CompileError."""
    path = Path(path)
    start = time.perf_counter()
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        spec_file = Path(tmp) / "spec.json"
        spec_file.write_text(json.dumps(spec))
        out = Path(tmp) / f"program{SUFFIX}"
        try:
            proc = subprocess.run([sys.executable, "-m", "edge_sdk.program.compile", str(spec_file), str(out)],
                                  capture_output=True, text=True, timeout=timeout_s, env=single_threaded_env())
        except subprocess.TimeoutExpired:
            raise CompileError(f"the compile ran past {timeout_s:.0f} s") from None
        if proc.returncode != 0:
            err = proc.stderr.strip()
            raise CompileError(err.splitlines()[-1] if err else f"exit status {proc.returncode}")
        blob = out.read_bytes()
        out.replace(path)
    return blob, time.perf_counter() - start


def build_cached(state_dir: str | Path, spec: dict, rebuild: bool = False) -> dict:
    """The program of ``spec`` in ``state_dir``'s cache: the cached file, else (or with ``rebuild``) compiled
    now. Returns {path, blob, digest, seconds, cached}. Raises CompileError, OSError."""
    path = cached_program_path(state_dir, spec)
    if path.exists() and not rebuild:
        blob, seconds, cached = path.read_bytes(), 0.0, True
    else:
        (blob, seconds), cached = compile_spec(spec, path), False
    return {"path": path, "blob": blob, "digest": program_digest(blob), "seconds": seconds, "cached": cached}


def single_threaded_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
