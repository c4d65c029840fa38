"""Server training against this host's roofline: samples per CPU-second of FedGKT's server step, variants
side by side, and the fp32 matmul peak measured in the same run.

The roofline is ``peak FLOP per CPU-second / FLOPs per sample`` with the peak measured here (a large fp32
sgemm on the fewest threads asked for, the best of several, in CPU time like the steps) and the FLOPs of one training sample (forward + backward)
counted by torch's ``FlopCounterMode``. The bf16 variant is held to the same fp32 roofline. Each variant trains the configured server model on synthetic
features held as the runtime holds them (int8 with per-channel scale, dequantized per batch); trials are
interleaved, so load from other processes hits every variant alike. CPU-seconds are this process's.

    python -m bench.server_step --threads 1 2 --trials 3 --steps 40 --out docs/bench/server_step

``--breakdown`` also prints where one step's time goes (torch.profiler, self CPU time by operator).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from cloud_runtime.config import ServerConfig
from cloud_runtime.features import CompactFeatures, FeatureStore, HeldUpload
from device_profiles.profiler import measure_peak_gflops
from model_zoo import create_model
from model_zoo.losses import gkt_loss
from model_zoo.optim import make_optimizer
from bench.plots import save_figure


def flops_per_sample(model: torch.nn.Module, shape: tuple, num_classes: int, batch: int = 64) -> float:
    """Forward + backward FLOPs of one training sample (FlopCounterMode over one batch)."""
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / batch


def synthetic_store(samples: int, shape: tuple, num_classes: int, devices: int = 4) -> FeatureStore:
    rng = np.random.default_rng(0)
    store = FeatureStore()
    per = samples // devices
    for d in range(devices):
        q = rng.integers(0, 256, (per, *shape), dtype=np.uint8)
        features = CompactFeatures(q, np.full(shape[0], 0.02, np.float32), np.zeros(shape[0], np.float32))
        store.put(HeldUpload(f"dev{d}", 0, "train", np.arange(per, dtype=np.int64), features,
                             rng.standard_normal((per, num_classes)).astype(np.float16),
                             rng.integers(0, num_classes, per)))
    return store


VARIANTS = {
    # name: (fused optimizer, flush denormals, bf16 autocast)
    "loop Adam (before)": (None, False, False),
    "fused Adam": (True, False, False),
    "fused Adam + flush denormals": (True, True, False),
    "fused Adam + bf16 autocast": (True, False, True),
}


def train_steps(variant: str, store: FeatureStore, model_name: str, num_classes: int, channels: int, steps: int,
                batch: int, threads: int) -> float:
    """Samples per CPU-second of ``steps`` server training steps (after 3 warm-up steps)."""
    fused, flush, bf16 = VARIANTS[variant]
    torch.set_num_threads(threads)
    torch.set_flush_denormal(flush)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=num_classes, feature_channels=channels).to(
        memory_format=torch.channels_last).train()
    cfg = ServerConfig(optimizer="adam", lr=1e-3, weight_decay=0.0)
    optimizer = make_optimizer(model.parameters(), cfg, fused=fused)
    devices, offsets = store.layout()
    order = np.random.default_rng(0).permutation(int(offsets[-1]))
    cpu = 0.0
    for step in range(steps + 3):
        if step == 3:
            cpu = time.process_time()
        index = order[(step * batch) % (len(order) - batch):][:batch]
        features, _, labels = store.batch(index, devices, offsets)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):  # server.precision: bf16
            out = model(torch.from_numpy(features).contiguous(memory_format=torch.channels_last)).float()
        loss, _, _ = gkt_loss(out, torch.from_numpy(labels), None, None, 0.0, 3.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.set_flush_denormal(False)
    return steps * batch / (time.process_time() - cpu)


CONV_OPS = ("aten::mkldnn_convolution", "aten::convolution_backward")


def breakdown(store: FeatureStore, model_name: str, num_classes: int, channels: int, batch: int, steps: int = 5,
              bf16: bool = False) -> tuple[str, float]:
    """torch.profiler's table (self CPU time by operator) of ``steps`` fused-Adam steps on 1 thread, and the
    samples per CPU-second of the convolutions alone (forward and backward, their self time): the rate if
    every other operator (batch norm, ReLU, residual adds, the optimizer) cost nothing."""
    from torch.profiler import ProfilerActivity, profile
    torch.set_num_threads(1)
    model = create_model(model_name, num_classes=num_classes, feature_channels=channels).to(
        memory_format=torch.channels_last).train()
    optimizer = make_optimizer(model.parameters(), ServerConfig(optimizer="adam", lr=1e-3), fused=True)
    devices, offsets = store.layout()
    index = np.arange(batch)
    features, _, labels = store.batch(index, devices, offsets)
    x, y = torch.from_numpy(features).contiguous(memory_format=torch.channels_last), torch.from_numpy(labels)

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x).float()
        loss = torch.nn.functional.cross_entropy(out, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step()
    events = prof.key_averages()
    conv_us = sum(e.self_cpu_time_total for e in events if e.key in CONV_OPS)
    return events.table(sort_by="self_cpu_time_total", row_limit=12), steps * batch / (conv_us / 1e6)


def plot(result: dict, path: Path) -> None:
    """Bars: median samples per CPU-second per variant and thread count, the measured roofline as a line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows, threads = result["results"], sorted({r["threads"] for r in result["results"]})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(threads)
    for i, t in enumerate(threads):
        values = [next(r["samples_per_cpu_s"] for r in rows if r["variant"] == v and r["threads"] == t)
                  for v in variants]
        ax.bar([x + i * width for x in range(len(variants))], values, width, label=f"{t} thread(s)")
    ax.axhline(result["roofline_samples_per_cpu_s"], color="k", ls="--", label="roofline (measured fp32 peak)")
    ax.axhline(result["roofline_samples_per_cpu_s"] / 2, color="gray", ls=":", label="50% of roofline")
    ax.set_xticks([x + width * (len(threads) - 1) / 2 for x in range(len(variants))], variants, fontsize=8)
    ax.set_ylabel("samples per CPU-second")
    ax.set_title(f"{result['args']['model']} server step, batch {result['args']['batch']}")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet55_server")
    parser.add_argument("--feature-shape", type=int, nargs=3, default=[16, 14, 14])
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--breakdown", action="store_true", help="print torch.profiler's operator table of a step")
    parser.add_argument("--out", default="docs/bench/server_step")
    args = parser.parse_args()
    shape = tuple(args.feature_shape)
    # GFLOP per CPU-second, like the steps: load from other processes lowers neither
    peak = {t: measure_peak_gflops(t, repeats=7, clock=time.process_time) for t in args.threads}
    torch.set_num_threads(1)
    model = create_model(args.model, num_classes=args.classes, feature_channels=shape[0]).to(
        memory_format=torch.channels_last)
    flops = flops_per_sample(model, shape, args.classes)
    per_core = peak[min(args.threads)]  # per CPU-second already
    roofline = per_core * 1e9 / flops  # samples per CPU-second at the measured peak
    print(f"{args.model} on {shape}: {flops / 1e6:.1f} MFLOP per training sample; fp32 matmul peak "
          + ", ".join(f"{peak[t]:.1f} GFLOP per CPU-second on {t} thread(s)" for t in args.threads)
          + f"; roofline {roofline:.0f} samples per CPU-second", flush=True)
    store = synthetic_store(max(4 * args.batch * (args.steps + 3), 4096), shape, args.classes)
    conv_only = {}
    if args.breakdown:  # the convolutions alone: what no change to the other operators can beat
        for name, bf16 in (("fp32", False), ("bf16", True)):
            table, conv_only[name] = breakdown(store, args.model, args.classes, shape[0], args.batch, bf16=bf16)
            print(f"{name}, 1 thread:\n{table}\nconvolutions alone ({name}): {conv_only[name]:.0f} samples per "
                  f"CPU-second ({conv_only[name] / roofline:.0%} of roofline)", flush=True)
    results: dict[str, dict[int, list[float]]] = {v: {t: [] for t in args.threads} for v in VARIANTS}
    for trial in range(args.trials):
        for threads in args.threads:
            for variant in VARIANTS:  # interleaved: other load hits every variant alike
                rate = train_steps(variant, store, args.model, args.classes, shape[0], args.steps, args.batch, threads)
                results[variant][threads].append(rate)
                print(f"trial {trial + 1}/{args.trials} {threads} thread(s) {variant}: {rate:.0f} samples/CPU-s "
                      f"({rate / roofline:.0%} of roofline)", flush=True)
    base = "loop Adam (before)"
    table = []
    for variant in VARIANTS:
        for threads in args.threads:
            median = statistics.median(results[variant][threads])
            table.append({"variant": variant, "threads": threads, "samples_per_cpu_s": median,
                          "roofline_fraction": median / roofline,
                          "vs_before": median / statistics.median(results[base][threads]),
                          "trials": results[variant][threads]})
    print(f"\n{'variant':32s} {'threads':>7s} {'samples/CPU-s':>14s} {'of roofline':>12s} {'vs before':>10s}")
    for row in table:
        print(f"{row['variant']:32s} {row['threads']:7d} {row['samples_per_cpu_s']:14.0f} "
              f"{row['roofline_fraction']:12.0%} {row['vs_before']:10.2f}x")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "model_mflops_per_sample": flops / 1e6, "matmul_peak_gflops": peak,
              "roofline_samples_per_cpu_s": roofline, "convolutions_alone_samples_per_cpu_s": conv_only,
              "torch": torch.__version__, "results": table}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "server_step.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
