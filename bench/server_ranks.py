"""Server training with 1 process and with N Gloo ranks under torchrun, side by side in one run: samples per
second of wall time and per CPU-second, as ratios to one process.

Each trial trains the configured server model (ResNet-55 on the quickstart's 16 x 14 x 14 features) for
``--rounds`` rounds of one epoch on synthetic int8 uploads held as the runtime holds them; the first round
(DDP set-up, allocator warm-up) is not timed. The trials alternate between the variants, so load from other
processes hits each alike. Every process gets ``cores // ranks`` torch threads.

    python -m bench.server_ranks --ranks 1 2 --trials 3 --samples 4000 --out docs/bench/server_ranks

On a 2-core machine no speedup is expected: 2 ranks of 1 thread do the work 1 process does with 2 threads,
plus the gradient all-reduce and global BatchNorm's per-layer all-reduce; the ratio measures that overhead.
On a cluster each rank has its own cores or GPU, so the compute part divides by N and the same overhead
(per step: one all-reduce of the gradients, 2 per BatchNorm layer) is what remains (docs/DEPLOYMENT.md).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def job(args) -> int:
    """One trial (inside a plain process or every torchrun rank): train, write rank 0's timings to --result."""
    import resource
    import torch
    from cloud_runtime.config import ServerConfig
    from cloud_runtime.distributed import TrainingGroup, launched, serve_rank
    from cloud_runtime.features import CompactFeatures, HeldUpload
    from cloud_runtime.server_trainer import GKTServer
    from edgefl_core.proc import usable_cores
    from model_zoo import create_model
    from types import SimpleNamespace
    launch = launched()
    ranks = launch.local_world_size if launch else 1
    torch.set_num_threads(max(1, usable_cores() // ranks))
    shape, classes = (16, 14, 14), 10
    cfg = ServerConfig(model="resnet55_server", optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=64,
                       device="cpu")
    spec = {"name": cfg.model, "num_classes": classes, "feature_channels": shape[0], "kwargs": {}}
    if launch is not None and not launch.coordinator:
        return serve_rank(launch, SimpleNamespace(server=cfg))
    group = TrainingGroup(launch) if launch is not None else None
    torch.manual_seed(0)
    server = GKTServer(create_model(cfg.model, num_classes=classes, feature_channels=shape[0]), cfg, classes,
                       group=group, model_spec=spec)
    rng = np.random.default_rng(0)
    per = args.samples // 4
    for d in range(4):
        q = rng.integers(0, 256, (per, *shape), dtype=np.uint8)
        features = CompactFeatures(q, np.full(shape[0], 0.02, np.float32), np.zeros(shape[0], np.float32))
        server.ingest(HeldUpload(f"dev{d}", 0, "train", np.arange(per, dtype=np.int64), features,
                                 rng.standard_normal((per, classes)).astype(np.float16),
                                 rng.integers(0, classes, per), {}))
    timings = []
    try:
        for round_ in range(args.rounds):
            wall, cpu = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
            server.train_round(round_)
            after = resource.getrusage(resource.RUSAGE_SELF)
            timings.append({"wall_s": time.perf_counter() - wall,
                            "cpu_s": after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime})
    finally:
        if group is not None:
            group.close()
    Path(args.result).write_text(json.dumps({"ranks": ranks, "samples": per * 4, "timings": timings[1:]}))
    return 0


def trial(ranks: int, args, result: Path) -> dict:
    """Run one trial; CPU-seconds of every rank come from the children's rusage (the coordinator's own
    measurement covers only itself)."""
    me = [str(Path(__file__).resolve()), "--job", "--result", str(result), "--samples", str(args.samples),
          "--rounds", str(args.rounds)]
    cmd = [sys.executable, *me] if ranks == 1 else [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks), *me]
    before = os.times()
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    after = os.times()
    if done.returncode != 0:
        raise SystemExit(f"{ranks}-rank trial failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    out = json.loads(result.read_text())
    wall = sum(t["wall_s"] for t in out["timings"])
    timed = out["samples"] * len(out["timings"])
    children_cpu = (after.children_user + after.children_system) - (before.children_user + before.children_system)
    return {"samples_per_s": timed / wall, "wall_s": wall, "all_ranks_cpu_s_whole_trial": children_cpu,
            "rank0_cpu_s_timed": sum(t["cpu_s"] for t in out["timings"])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=3, help="per trial; the first is not timed")
    parser.add_argument("--out", default="docs/bench/server_ranks")
    parser.add_argument("--job", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.job:
        return job(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[int, list[dict]] = {r: [] for r in args.ranks}
    for t in range(args.trials):
        for ranks in args.ranks:  # alternating: load from elsewhere hits every variant alike
            got = trial(ranks, args, out / f".trial-{ranks}.json")
            runs[ranks].append(got)
            print(f"trial {t + 1}/{args.trials}, {ranks} rank(s): {got['samples_per_s']:.0f} samples/s", flush=True)
    base = statistics.median(r["samples_per_s"] for r in runs[args.ranks[0]])
    rows = []
    for ranks in args.ranks:
        median = statistics.median(r["samples_per_s"] for r in runs[ranks])
        rows.append({"ranks": ranks, "median_samples_per_s": median, "ratio_to_1": median / base,
                     "trials": runs[ranks]})
    for p in out.glob(".trial-*.json"):
        p.unlink()
    command = ("python -m bench.server_ranks --ranks " + " ".join(map(str, args.ranks)) +
               f" --trials {args.trials} --samples {args.samples} --rounds {args.rounds}")
    (out / "results.json").write_text(json.dumps({"command": command, "cores": os.cpu_count(), "rows": rows},
                                                 indent=1))
    print(f"\n{command}\n| ranks | samples/s (median) | vs 1 process |\n| ---: | ---: | ---: |")
    for row in rows:
        print(f"| {row['ranks']} | {row['median_samples_per_s']:.0f} | {row['ratio_to_1']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
