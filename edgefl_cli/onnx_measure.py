"""``device-profile --engine onnxruntime``: the step of a device on ``engine: onnxruntime``, measured here.

The model is compiled into an edge program exactly as the runtime compiles one for a device
(:func:`cloud_runtime.program_build.compile_spec`: ``python -m edge_sdk.program.compile`` in its own process;
trainer ``backprop``, SGD with momentum 0.9 as the torch rows) and run by
:class:`edge_sdk.program.runner.ProgramRunner` in a fresh process that never imports torch, as on a device:
``backprop`` times one ``train_step`` (forward, backward and the FedGKT loss in the graph, the numpy SGD
update), ``inference`` one ``extract`` (logits and features, eval mode). The same process reports its peak
RSS and its baseline once onnxruntime's sessions are built. Device profiles' ``efficiency.onnxruntime_cpu``
drives the per-device estimates of these rows.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path



def onnx_problem(model: str) -> str | None:
    """Why ``model`` has no onnxruntime rows (None when it has)."""
    if model.endswith("_server"):
        return "is a server model: only edge models are compiled into edge programs"
    return None


def profile_spec(model: str, batch: int, input_shape, num_classes: int = 10) -> dict:
    """The program spec of the torch rows' step: ``model`` trained by backprop with SGD (lr 1e-3, momentum 0.9)."""
    from cloud_runtime.program_build import torch_version
    from edge_sdk.config import EdgeConfig
    from edge_sdk.program.spec import program_spec
    edge = EdgeConfig(model=model, trainer="backprop", optimizer="sgd", lr=1e-3, momentum=0.9, weight_decay=0.0,
                      batch_size=batch)
    return program_spec(edge, num_classes, input_shape, 0, torch_version())


def compile_for_profile(model: str, batch: int, input_shape, directory: str | Path, num_classes: int = 10
                        ) -> tuple[Path, float]:
    """Compile the program of :func:`profile_spec` into ``directory``; returns (path, compile seconds)."""
    from cloud_runtime.program_build import compile_spec
    from edge_sdk.program.spec import spec_key
    spec = profile_spec(model, batch, input_shape, num_classes)
    path = Path(directory) / f"{spec_key(spec)}.edgeprog"
    _, seconds = compile_spec(spec, path)
    return path, seconds


_MEASURE = """\
import json, statistics, sys, time
from pathlib import Path
import numpy as np
from edge_sdk.program.format import unpack_program
from edge_sdk.program.runner import ProgramRunner
path, method, batch, threads, repeats, warmup = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
program = unpack_program(Path(path).read_bytes())
runner = ProgramRunner(program, threads=threads)
base = peak_rss_kb()
rng = np.random.default_rng(0)
k, shape = program.manifest["num_classes"], program.manifest["input_shape"]
x = rng.standard_normal((batch, *shape), dtype=np.float32)
y = rng.integers(0, k, batch).astype(np.int64)
step = (lambda: runner.train_step(x, y)) if method == "backprop" else (lambda: runner.extract(x))
for _ in range(warmup):
    step()
times = []
for _ in range(repeats):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
peak = peak_rss_kb()
print(json.dumps({"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
                  "repeats": repeats, "threads": threads, "peak_rss_mb": peak / 1024, "baseline_rss_mb": base / 1024,
                  "step_rss_mb": (peak - base) / 1024, "torch_loaded": "torch" in sys.modules}))
"""


def measure_program(path: str | Path, method: str, batch: int, threads: int = 1, repeats: int = 15,
                    warmup: int = 5) -> dict:
    """Median wall time of one step of the program at ``path`` (``method``: backprop = train_step, inference =
    extract) and the peak RSS of the fresh, torch-free process that ran it."""
    if method not in ("backprop", "inference"):
        raise ValueError(f"unknown method {method!r}")
    from device_profiles.profiler import PEAK_RSS_KB_CODE
    proc = subprocess.run([sys.executable, "-c", PEAK_RSS_KB_CODE + _MEASURE, str(path), method, str(batch), str(threads),
                           str(repeats), str(warmup)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"onnxruntime measurement failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result.pop("torch_loaded"):
        raise RuntimeError("the onnxruntime measurement loaded torch: it would not be a device's footprint")
    return result
