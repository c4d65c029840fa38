"""onnxruntime vs torch on the edge, side by side in one run: step time per trainer, agent peak RSS during a
quickstart round, and the installed size of a device's environment.

    .venv/bin/python bench/edge_engine.py [--steps 40] [--rss] [--sizes] [--out docs/figures/edge_engine.json]

* step time: the quickstart's edge model (resnet8_gkt, stride-2 stem, 1x28x28, batch 64, 10 classes, Adam),
  one training step of each trainer on the same batches, torch's trainer vs the compiled graph in
  onnxruntime + the numpy optimizer, both on ``--threads`` threads; medians over ``--steps`` after warm-up,
  alternating engines step by step so a noisy neighbour hits both alike.
* RSS (``--rss``): ``edgefl-sim`` runs one quickstart round (configs/quickstart.yaml, ``run.rounds=1``) with a
  mixed fleet (even devices torch, odd onnxruntime); each agent's peak RSS is what its heartbeats report
  (VmHWM: this process image's own peak), read from the runtime's report.
* installed size (``--sizes``): two fresh virtual environments, ``pip install .`` (a device on onnxruntime:
  the base install) and ``pip install torch==2.13.0 '.[torch]'`` (a device on torch): what the install added
  to site-packages (``du``, less the fresh venv's own pip).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def step_times(steps: int, threads: int) -> list[dict]:
    import numpy as np
    import torch

    from edge_sdk.config import EdgeConfig
    from edge_sdk.program.compile import build_model, compile_program
    from edge_sdk.program.runner import ProgramRunner
    from edge_sdk.trainers import create_trainer

    torch.set_num_threads(threads)
    rows = []
    for trainer, kwargs in (("backprop", {}), ("fg_weight", {"exact_classifier": True})):
        edge = EdgeConfig(model="resnet8_gkt", model_kwargs={"stem_stride": 2}, trainer=trainer, optimizer="adam",
                          lr=1e-3, weight_decay=0.0, batch_size=64, trainer_kwargs=kwargs)
        start = time.perf_counter()
        program = compile_program(edge, 10, (1, 28, 28), seed=0)
        compile_s = time.perf_counter() - start
        runner = ProgramRunner(program, threads=threads)
        model = build_model(edge, 10, (1, 28, 28), 0).to(memory_format=torch.channels_last)
        trainer_pt = create_trainer(trainer, model, edge)
        g = torch.Generator().manual_seed(0)
        x = torch.randn(64, 1, 28, 28, generator=g).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 10, (64,), generator=g)
        teacher, mask = torch.randn(64, 10, generator=g), torch.rand(64, generator=g) > 0.5
        xn, yn, tn, mn = x.contiguous().numpy(), y.numpy(), teacher.numpy(), mask.numpy().astype(np.float32)
        times = {"torch": [], "onnxruntime": []}
        for i in range(steps + 5):
            t = time.perf_counter()
            trainer_pt.train_step(x, y, teacher, mask)
            pt = time.perf_counter() - t
            t = time.perf_counter()
            runner.train_step(xn, yn, tn, mn)
            ort = time.perf_counter() - t
            if i >= 5:
                times["torch"].append(pt)
                times["onnxruntime"].append(ort)
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        rows.append({"trainer": trainer, "threads": threads, "torch_ms": round(med["torch"], 2),
                     "onnxruntime_ms": round(med["onnxruntime"], 2),
                     "ratio_onnxruntime_over_torch": round(med["onnxruntime"] / med["torch"], 3),
                     "compile_s": round(compile_s, 1), "graph_bytes": sum(len(b) for b in program.graphs.values())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def agent_rss(out: Path) -> dict:
    """One quickstart round with a mixed fleet; peak RSS per agent from the runtime's report."""
    run = out / "rss-run"
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "edgefl_cli.sim", "--config", str(ROOT / "configs/quickstart.yaml"), "--out", str(run),
           "--set", "run.rounds=1", "--set", "deployment.agent_engine=mixed"]
    print("running", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    report = json.loads((run / "report.json").read_text())
    per = {name: {"engine": d.get("engine"), "rss_mb": (d.get("heartbeat") or {}).get("rss_mb")}
           for name, d in report["devices"].items()}
    by_engine: dict = {}
    for d in per.values():
        by_engine.setdefault(d["engine"], []).append(d["rss_mb"])
    summary = {e: round(max(v), 1) for e, v in by_engine.items() if all(x is not None for x in v)}
    result = {"devices": per, "peak_rss_mb_by_engine": summary}
    if "torch" in summary and "onnxruntime" in summary:
        result["ratio_torch_over_onnxruntime"] = round(summary["torch"] / summary["onnxruntime"], 2)
    print(json.dumps(result), flush=True)
    return result


def site_packages_mb(venv: Path) -> float:
    (site,) = list((venv / "lib").glob("python3*/site-packages"))
    out = subprocess.run(["du", "-sk", str(site)], capture_output=True, text=True, check=True).stdout
    return int(out.split()[0]) / 1024


def install_sizes(work: Path) -> dict:
    """Fresh venvs: the device's base install (onnxruntime) vs a torch device's."""
    sizes = {}
    for name, packages in (("onnxruntime", [str(ROOT)]), ("torch", ["torch==2.13.0", f"{ROOT}[torch]"])):
        venv = work / f"venv-{name}"
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        empty = site_packages_mb(venv)  # pip (and setuptools) of a fresh venv: not what the install adds
        subprocess.run([str(venv / "bin/pip"), "install", "-q", *packages], check=True)
        sizes[name] = round(site_packages_mb(venv) - empty, 1)
        print(json.dumps({name: sizes[name], "fresh_venv_mb": round(empty, 1)}), flush=True)
    result = {"site_packages_mb": sizes, "ratio_torch_over_onnxruntime": round(sizes["torch"] / sizes["onnxruntime"], 2)}
    print(json.dumps(result), flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rss", action="store_true", help="also run a quickstart round with a mixed fleet")
    parser.add_argument("--sizes", action="store_true", help="also build the two device environments")
    parser.add_argument("--out", default=str(ROOT / "docs/figures/edge_engine.json"))
    args = parser.parse_args()
    result = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "cpu_count": os.cpu_count(),
              "step_time": step_times(args.steps, args.threads)}
    with tempfile.TemporaryDirectory() as tmp:
        if args.sizes:
            result["install"] = install_sizes(Path(tmp))
        if args.rss:
            result["agent_rss"] = agent_rss(Path(tmp))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
