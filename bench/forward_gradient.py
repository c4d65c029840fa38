"""Forward-gradient edge trainers vs backprop: step time, peak memory and final FedGKT accuracy.

    python -m bench.forward_gradient --part timing      # step time + peak memory, ~5 min -> timing.json
    python -m bench.forward_gradient --part accuracy    # one quickstart run per method (~12 min each), resumable
    python -m bench.forward_gradient --part table       # markdown table + PNG from both

Step time: each method's median over interleaved repeats in this one process (ratio to backprop
measured side by side). Peak memory: a fresh process per method runs a few steps and reports its
peak RSS over the post-setup baseline, and the profiler's peak allocated CPU memory during one step
(torch.profiler memory events). Accuracy: ``edgefl-sim --transport memory`` on configs/quickstart.yaml
with ``--set edge.trainer=...`` (and the model), the final test accuracy of the FedGKT server.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from edge_sdk.config import EdgeConfig, build_dataclass
from edge_sdk.trainers import create_trainer
from model_zoo import create_model

# name -> (edge.trainer, edge.trainer_kwargs)
METHODS: dict[str, tuple[str, dict]] = {
    "backprop": ("backprop", {}),
    "fg_weight": ("fg_weight", {}),
    "fg_weight_exact_cls": ("fg_weight", {"exact_classifier": True}),
    "fg_local_guess": ("fg_local_guess", {"projection": "per_module"}),
    "forward": ("forward", {}),
    "async_fgd": ("async_fgd", {"modules": 3}),
    "async_fgd_parallel": ("async_fgd", {"modules": 3, "parallel": True}),
    # baseline: FG on the classifier only, so the extractor (all the server ever sees) stays at its init
    "frozen_extractor": ("fg_weight", {"params": "classifier"}),
}


def make_trainer(model_name: str, method: str, in_channels: int, stem_stride: int):
    trainer, kwargs = METHODS[method]
    cfg = build_dataclass(EdgeConfig, {"trainer": trainer, "trainer_kwargs": kwargs, "optimizer": "adam",
                                       "lr": 1e-3, "weight_decay": 0.0}, "edge")
    model = create_model(model_name, num_classes=10, in_channels=in_channels, stem_stride=stem_stride)
    return create_trainer(trainer, model.to(memory_format=torch.channels_last), cfg)


def batch(size: int, shape: tuple[int, ...], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(size, *shape, generator=g).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 10, (size,), generator=g), torch.randn(size, 10, generator=g)


def step(trainer, x, y, teacher):
    return trainer.train_step(x, y, teacher, torch.ones(len(y), dtype=torch.bool))


def time_methods(model_name: str, methods: list[str], args) -> dict[str, float]:
    """Median seconds per step, methods interleaved so drift in machine load hits all of them alike."""
    x, y, teacher = batch(args.batch, args.shape)
    trainers = {m: make_trainer(model_name, m, args.shape[0], args.stem_stride) for m in methods}
    for t in trainers.values():
        for _ in range(3):
            step(t, x, y, teacher)
    samples: dict[str, list[float]] = {m: [] for m in methods}
    for _ in range(args.repeats):
        for m, t in trainers.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                step(t, x, y, teacher)
            samples[m].append((time.perf_counter() - start) / args.steps)
    return {m: statistics.median(v) for m, v in samples.items()}


def child_memory(model_name: str, method: str, args_json: str) -> None:
    """Runs in a fresh process: prints peak RSS over baseline and the profiler's peak allocation."""
    args = argparse.Namespace(**json.loads(args_json))
    torch.set_num_threads(args.threads)
    trainer = make_trainer(model_name, method, args.shape[0], args.stem_stride)
    x, y, teacher = batch(args.batch, tuple(args.shape))
    # ru_maxrss would still hold the import-time high-water mark; reset the kernel's (Linux >= 4.0).
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kb("VmRSS")  # torch, model and batch loaded
    for _ in range(4):
        step(trainer, x, y, teacher)
    peak = _status_kb("VmHWM")
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        step(trainer, x, y, teacher)
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    allocated = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    if METHODS[method][1].get("parallel"):
        allocated = []  # the CPU profiler does not see allocations made on the stage threads: no figure
    start = allocated[0] if allocated else 0
    print(json.dumps({"rss_step_mb": (peak - base) / 1024, "rss_peak_mb": peak / 1024,  # kB -> MB
                      "profiler_peak_mb": (max(allocated) - start) / 2 ** 20 if allocated else None}))


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def measure_memory(model_name: str, method: str, args) -> dict:
    payload = json.dumps({"shape": list(args.shape), "batch": args.batch, "stem_stride": args.stem_stride,
                          "threads": args.threads})
    out = subprocess.run([sys.executable, "-m", "bench.forward_gradient", "--child", model_name, method, payload],
                         capture_output=True, text=True, check=True, env={**os.environ, "PYTHONPATH": "."})
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_accuracy(model_name: str, method: str, out_dir: Path, config: str) -> dict:
    report_path = out_dir / "runs" / f"{model_name}-{method}" / "report.json"
    done = report_path.exists() and "final" in json.loads(report_path.read_text())  # resumable
    if not done:
        trainer, kwargs = METHODS[method]
        cmd = [sys.executable, "-m", "edgefl_cli.sim", "--config", config, "--transport", "memory",
               "--out", str(report_path.parent), "--set", f"edge.trainer={trainer}",
               "--set", f"edge.trainer_kwargs={json.dumps(kwargs)}", "--set", f"edge.model={model_name}"]
        print("  $", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": "."}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
    report = json.loads(report_path.read_text())
    last_edge = report["rounds"][-1]["edge"].values()
    return {"final_accuracy": report["final"]["test_accuracy"],
            "best_accuracy": report["final"]["best_test_accuracy"],
            "edge_train_accuracy": statistics.mean(e["train_accuracy"] for e in last_edge),
            "edge_samples_per_s": statistics.mean(e["samples_per_s"] for e in last_edge),
            "seconds": report["final"]["total_seconds"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--models", default="resnet8_gkt,resnet20_gkt")
    parser.add_argument("--methods", default=",".join(m for m in METHODS if m != "frozen_extractor"))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--shape", default="1x28x28", help="C x H x W of one image (Fashion-MNIST)")
    parser.add_argument("--stem-stride", type=int, default=2, help="the quickstart's stem stride")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--part", choices=["timing", "accuracy", "table"], default="timing")
    parser.add_argument("--accuracy-methods", default="backprop,fg_weight,fg_weight_exact_cls,forward,async_fgd,"
                                                      "frozen_extractor")
    parser.add_argument("--accuracy-models", default="resnet8_gkt,resnet20_gkt:backprop,forward",
                        help="model[:method,method] list; a model without methods uses --accuracy-methods")
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--out", default="docs/bench/forward_gradient")
    args = parser.parse_args()
    if args.child:
        child_memory(args.child[0], args.child[1], args.child[2])
        return
    args.shape = tuple(int(v) for v in args.shape.split("x"))
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "child"}
    if args.part == "timing":
        methods = args.methods.split(",")
        results: dict = {"settings": settings, "torch": torch.__version__, "cpu_count": os.cpu_count(), "rows": []}
        for model_name in args.models.split(","):
            print(f"{model_name}: timing {len(methods)} methods", flush=True)
            times = time_methods(model_name, methods, args)
            for method in methods:
                mem = measure_memory(model_name, method, args)
                row = {"model": model_name, "method": method, "step_ms": times[method] * 1e3,
                       "time_vs_backprop": times[method] / times["backprop"] if "backprop" in times else None, **mem}
                results["rows"].append(row)
                peak = mem["profiler_peak_mb"]
                print(f"  {method:22s} {row['step_ms']:8.1f} ms/step  x{row['time_vs_backprop']:.2f}  "
                      f"RSS +{mem['rss_step_mb']:.1f} MB  profiler peak "
                      f"{'n/a' if peak is None else format(peak, '.1f')} MB", flush=True)
                (out / "timing.json").write_text(json.dumps(results, indent=2))  # partial results survive
    elif args.part == "accuracy":
        rows = []
        for spec in _split_specs(args.accuracy_models):
            model_name, _, names = spec.partition(":")
            for method in (names.split(",") if names else args.accuracy_methods.split(",")):
                acc = run_accuracy(model_name, method, out, args.config)
                rows.append({"model": model_name, "method": method, **acc})
                print(f"  accuracy {model_name:14s} {method:22s} {acc['final_accuracy']:.4f}", flush=True)
                (out / "accuracy.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=2))
    else:
        print(table(out))


def table(out: Path) -> str:
    """Markdown table joining timing.json and accuracy.json, and a PNG of time/memory/accuracy per method."""
    timing = json.loads((out / "timing.json").read_text())["rows"] if (out / "timing.json").exists() else []
    accuracy = json.loads((out / "accuracy.json").read_text())["rows"] if (out / "accuracy.json").exists() else []
    acc = {(r["model"], r["method"]): r for r in accuracy}
    lines = ["| model | method | step ms | x backprop | profiler peak MB | RSS step MB | FedGKT acc | edge train acc |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in timing:
        a = acc.get((r["model"], r["method"]), {})
        fmt = lambda v, f: format(v, f) if v is not None else "–"  # noqa: E731
        lines.append(f"| {r['model']} | {r['method']} | {r['step_ms']:.1f} | {r['time_vs_backprop']:.2f} | "
                     f"{fmt(r['profiler_peak_mb'], '.1f')} | {r['rss_step_mb']:.1f} | "
                     f"{fmt(a.get('final_accuracy'), '.4f')} | {fmt(a.get('edge_train_accuracy'), '.3f')} |")
    timed = {(r["model"], r["method"]) for r in timing}
    for (model, method), a in acc.items():  # accuracy-only rows (baselines not in the timing run)
        if (model, method) not in timed:
            lines.append(f"| {model} | {method} | – | – | – | – | {a['final_accuracy']:.4f} | "
                         f"{a['edge_train_accuracy']:.3f} |")
    if timing:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        models = list(dict.fromkeys(r["model"] for r in timing))
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for ax, key, title in zip(axes, ("time_vs_backprop", "profiler_peak_mb", None),
                                  ("step time / backprop", "profiler peak MB", "FedGKT test accuracy")):
            for i, model in enumerate(models):
                rows = [r for r in timing if r["model"] == model]
                values = [(r[key] or 0) if key else (acc.get((model, r["method"]), {}).get("final_accuracy") or 0)
                          for r in rows]
                xs = [j + i * 0.4 for j in range(len(rows))]
                ax.bar(xs, values, width=0.4, label=model)
                ax.set_xticks([j + 0.2 for j in range(len(rows))], [r["method"] for r in rows], rotation=45,
                              ha="right")
            ax.set_title(title)
            if key is None:
                ax.set_ylim(0.7, 0.9)
        axes[0].legend()
        fig.tight_layout()
        fig.savefig(out / "forward_gradient.png", dpi=110)
    return "\n".join(lines)


def _split_specs(text: str) -> list[str]:
    """'a,b:x,y' -> ['a', 'b:x,y']: a comma starts a new model unless it follows a 'model:' list."""
    specs: list[str] = []
    for part in text.split(","):
        if specs and ":" in specs[-1] and part in METHODS:
            specs[-1] += "," + part
        else:
            specs.append(part)
    return specs


if __name__ == "__main__":
    main()
