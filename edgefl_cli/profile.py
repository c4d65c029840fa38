"""``device-profile``: FLOPs, memory, latency and bytes of a model on each device profile.

    device-profile resnet8_gkt --all-devices [--method backprop] [--batch 64] [--input 3x32x32] [--json] [--plot p.png]
    device-profile resnet8_gkt --model-kwargs '{stem_stride: 2}' --input 1x28x28 --measure
    device-profile compare resnet8_gkt resnet56 resnet110 [--json]
    device-profile --measure [--engine torch|onnxruntime|both] [--save-profile host.yaml] [--json]

Every latency row names its engine: ``torch`` (the torch engine's step) or ``onnxruntime`` (a device on
``engine: onnxruntime``: the model compiled into an edge program, run by onnxruntime and numpy in a fresh
torch-free process, :mod:`edgefl_cli.onnx_measure`; per-device estimates use the profile's
``efficiency.onnxruntime_cpu``). ``--engine`` defaults to torch: measuring onnxruntime compiles each edge
model first (tens of seconds to minutes each).

``--model-kwargs`` (a YAML mapping) builds the model as a run's ``edge.model_kwargs`` /
``server.model_kwargs`` do, so the figures describe the configured model. ``--measure`` measures this
host's fp32 peak (a sgemm on every thread, :func:`~device_profiles.profiler.measure_peak_gflops`) instead of
deriving it from the CPU flags, and prints each measured step's roofline efficiency (its FLOP/s over
that peak) next to the estimates.

Progress (which model, which measurement, i/n, elapsed) goes to stderr; results to stdout.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from edgefl_cli.needs import require_torch

require_torch("device-profile")  # before the imports that need it

import numpy as np
import yaml

from device_profiles import DeviceProfile, Efficiency, detect_host, list_profiles, load_profile
from device_profiles.profiler import (ENGINE_RUNTIMES, METHODS, cost_row, estimate_latency, measure_latency,
                                     measure_peak_gflops, measure_peak_rss, model_cost)
from cloud_runtime.progress import duration
from edgefl_cli.onnx_measure import compile_for_profile, measure_program, onnx_problem
from edgefl_core.config import ConfigError
from model_zoo import list_models

logger = logging.getLogger("edgefl.device_profile")
ENGINES = tuple(ENGINE_RUNTIMES)   # torch, onnxruntime


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--input {text!r}: expected CxHxW, e.g. 3x32x32") from None
    if len(shape) != 3 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"--input {text!r}: expected three positive sizes CxHxW")
    return shape


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_model_kwargs(text: str) -> dict:
    """``--model-kwargs '{stem_stride: 2}'``: a YAML mapping of model options."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise argparse.ArgumentTypeError(f"--model-kwargs {text!r}: not YAML ({str(e).splitlines()[0]})") from None
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise argparse.ArgumentTypeError(f"--model-kwargs {text!r}: expected a mapping, e.g. '{{stem_stride: 2}}'")
    return value


def _input_for(model: str, shape: tuple) -> tuple:
    # Server bodies take the edge's 16-channel features at the image's resolution.
    return (16, shape[1], shape[2]) if model.endswith("_server") else shape


def _shape(shape: tuple) -> str:
    return "x".join(map(str, shape))


def _fmt_flops(f: float) -> str:
    return f"{f / 1e9:.2f} GFLOP" if f >= 1e8 else f"{f / 1e6:.1f} MFLOP"


class Steps:
    """Progress of a slow command on stderr (its stdout, JSON included, stays as it was)::

        device-profile compare: [2/3] resnet56: FLOPs and memory of a backprop step, batch 64 (elapsed 12 s)
    """

    def __init__(self, command: str, total: int, stream=None):
        self.command, self.total, self.stream = command, total, stream
        self.done = 0
        self.start = time.monotonic()

    def _print(self, text: str) -> None:
        print(f"{self.command}: {text}", file=self.stream or sys.stderr, flush=True)

    def __call__(self, what: str) -> None:
        """The next step starts: say which, i/n and the time so far."""
        self.done += 1
        self._print(f"[{self.done}/{self.total}] {what} (elapsed {duration(time.monotonic() - self.start)})")

    def finish(self) -> None:
        self._print(f"done: {self.done} steps in {duration(time.monotonic() - self.start)}")


def cmd_compare(models: list[str], batch: int, shape: tuple, as_json: bool, model_kwargs: dict | None = None) -> int:
    steps = Steps("device-profile compare", len(models))
    rows = []
    for m in models:
        steps(f"{m}: FLOPs and memory of a backprop step, batch {batch}, input {_shape(_input_for(m, shape))}")
        rows.append(cost_row(model_cost(m, "backprop", batch, _input_for(m, shape), **(model_kwargs or {}))))
    steps.finish()
    base = rows[0]
    for r in rows:
        r["train_flops_ratio"] = r["train_flops"] / base["train_flops"]
        r["params_ratio"] = r["params"] / base["params"]
    if as_json:
        print(json.dumps([{k: r[k] for k in ("model", "params", "train_flops", "train_flops_per_sample",
                                             "forward_flops", "backward_flops", "memory_bytes", "activation_bytes",
                                             "train_flops_ratio", "params_ratio")} for r in rows], indent=2))
        return 0
    print(f"{'model':<18} {'params':>11} {'train FLOPs/sample':>19} {'x first':>8} {'params x':>9} {'train memory':>13}")
    for r in rows:
        print(f"{r['model']:<18} {r['params']:>11,} {_fmt_flops(r['train_flops_per_sample']):>19} "
              f"{r['train_flops_ratio']:>8.2f} {r['params_ratio']:>9.1f} {r['memory_bytes'] / 2**20:>10.1f} MiB")
    return 0


def _estimates(cost, profiles: list[DeviceProfile], engine: str) -> dict:
    """Per-profile latency estimates of ``engine``'s step (an entry with ``error`` where a profile has no
    efficiency for it)."""
    out = {}
    for p in profiles:
        try:
            out[p.name] = estimate_latency(cost, p, ENGINE_RUNTIMES[engine])
        except ValueError as e:
            out[p.name] = {"device": p.name, "runtime": ENGINE_RUNTIMES[engine],
                           "error": f"{e} (calibrate it: device-profile --measure --engine {engine})"}
    return out


def _threads() -> int:
    import torch
    return torch.get_num_threads()


def cmd_profile(model: str, devices: list[str], methods: list[str], batch: int, shape: tuple, as_json: bool,
                plot: str | None, measure_here: bool = False, engines: tuple[str, ...] = ("torch",),
                model_kwargs: dict | None = None) -> int:
    profiles = [load_profile(d) for d in devices]
    kwargs = model_kwargs or {}
    onnx = "onnxruntime" in engines
    if onnx and kwargs:
        raise ConfigError("--model-kwargs: the onnxruntime engine compiles the zoo's default model; use --engine torch")
    peak = measure_peak_gflops() if measure_here else None  # this host's compute roof, measured
    if onnx and (why := onnx_problem(model)):
        raise ConfigError(f"--engine {'both' if len(engines) > 1 else 'onnxruntime'}: {model} {why}")
    out = []
    per_method = 1 + (2 * ("torch" in engines) + onnx if measure_here else 0)
    steps = Steps("device-profile", len(methods) * per_method + (onnx and measure_here))
    on = f"{len(profiles)} device profiles" if len(profiles) > 1 else f"device profile {profiles[0].name}"
    with tempfile.TemporaryDirectory(prefix="device-profile-") as tmp:
        program = None
        if onnx and measure_here:
            steps(f"{model}, batch {batch}, input {_shape(shape)}: compiling its edge program for onnxruntime "
                  "(a separate process)")
            program = compile_for_profile(model, batch, shape, tmp)
        for method in methods:
            what = f"{model} {method}, batch {batch}, input {_shape(_input_for(model, shape))}"
            steps(f"{what}: FLOPs, memory and latency estimates on {on}")
            cost = model_cost(model, method, batch, _input_for(model, shape), **kwargs)
            for engine in engines:
                row = cost_row(cost)
                row["engine"] = engine
                row["devices"] = _estimates(cost, profiles, engine)
                if measure_here and engine == "torch":  # this host: median step time and the peak RSS of a fresh process
                    steps(f"{what}: measuring the step time on this host")
                    row["measured_here"] = measure_latency(model, method, batch, _input_for(model, shape), **kwargs)
                    steps(f"{what}: measuring the peak memory on this host (a fresh process)")
                    row["measured_here"].update(measure_peak_rss(model, method, batch, _input_for(model, shape),
                                                                 **kwargs))
                elif measure_here:  # the compiled program, in a fresh torch-free process: step time and peak RSS
                    steps(f"{what}: measuring the onnxruntime step time and peak memory on this host (a fresh "
                          "process, no torch)")
                    row["measured_here"] = measure_program(program[0], method, batch, threads=_threads())
                    row["measured_here"]["compile_seconds"] = round(program[1], 2)
                if measure_here:  # achieved FLOP/s over the measured peak: how far from the compute roof
                    m = row["measured_here"]
                    m.update(peak_gflops=round(peak, 1), achieved_gflops=round(cost.total_flops / m["median_s"] / 1e9, 2),
                             roofline_efficiency=cost.total_flops / m["median_s"] / (peak * 1e9))
                out.append(row)
    steps.finish()
    if as_json:
        print(json.dumps(out, indent=2, default=list))
    else:
        method = None
        for row in out:
            if row["method"] != method:
                method = row["method"]
                print(f"{row['model']} {row['method']} batch {row['batch']} input {'x'.join(map(str, row['input_shape']))}: "
                      f"{row['params']:,} params, {_fmt_flops(row['total_flops'])} (fwd {_fmt_flops(row['forward_flops'])}, "
                      f"bwd {_fmt_flops(row['backward_flops'])}), memory {row['memory_bytes'] / 2**20:.1f} MiB "
                      f"(activations {row['activation_bytes'] / 2**20:.1f} MiB)")
                if row["upload_bytes_per_sample"]:
                    print("  FedGKT upload bytes/sample before zstd: " + ", ".join(
                        f"{k} {v:,}" for k, v in row["upload_bytes_per_sample"].items())
                        + f"; FedAvg model {row['fedavg_model_bytes'] / 1e6:.2f} MB per direction")
                print(f"  {'engine':<12} {'where':<20} {'ms/step':>9}")
            engine = row["engine"]
            if "measured_here" in row:
                m = row["measured_here"]
                print(f"  {engine:<12} {'measured here':<20} {m['median_s'] * 1e3:9.1f} ms/step (median of "
                      f"{m['repeats']}, {m['threads']} threads), peak RSS {m['peak_rss_mb']:.0f} MB "
                      f"(+{m['step_rss_mb']:.1f} MB over the process baseline); {m['achieved_gflops']:.1f} GFLOP/s = "
                      f"{m['roofline_efficiency']:.0%} of this host's measured {m['peak_gflops']:.0f} GFLOP/s fp32 peak")
            for name, est in row["devices"].items():
                if "error" in est:
                    print(f"  {engine:<12} {name:<20} no estimate: {est['error']}")
                    continue
                print(f"  {engine:<12} {name:<20} {est['estimate_s'] * 1e3:9.1f} ms/step  [{est['low_s'] * 1e3:.1f} - "
                      f"{est['high_s'] * 1e3:.1f}]  {est['bound']}-bound{'' if est['fits_in_ram'] else '  DOES NOT FIT'}")
    if plot:
        plot_devices(out, plot)
    return 0


def plot_devices(rows: list[dict], path: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.0), dpi=120)
    names = list(rows[0]["devices"])
    width = 0.8 / len(rows)
    engines = {row.get("engine", "torch") for row in rows}
    for i, row in enumerate(rows):
        dev = [row["devices"][n] for n in names]
        est = [d.get("estimate_s", np.nan) * 1e3 for d in dev]
        low = [e - d.get("low_s", np.nan) * 1e3 for e, d in zip(est, dev)]
        high = [d.get("high_s", np.nan) * 1e3 - e for e, d in zip(est, dev)]
        label = row["method"] + (f" ({row['engine']})" if len(engines) > 1 else "")
        ax.bar(np.arange(len(names)) + i * width, est, width, yerr=[low, high], capsize=2, label=label)
    ax.set_xticks(np.arange(len(names)) + width * (len(rows) - 1) / 2, names, rotation=30, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("ms per step (estimate, band)")
    ax.set_title(f"{rows[0]['model']}, batch {rows[0]['batch']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def measure_bandwidth_gbs(megabytes: int = 256, repeats: int = 5) -> float:
    """Copy bandwidth (read + write) of a large array: the memory side of the host's roofline."""
    a = np.ones(megabytes * 2**20 // 8)
    b = np.empty_like(a)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(b, a)
        best = min(best, time.perf_counter() - start)
    return 2 * a.nbytes / best / 1e9


def fit_efficiency(profile: DeviceProfile, rows: list[dict]) -> Efficiency:
    """Grid-search the compute and memory efficiencies that minimise the RMS of log(estimate / measured)."""
    compute, memory = _fit(profile, rows)
    return Efficiency(torch_cpu=compute, memory=memory)


def _fit(profile: DeviceProfile, rows: list[dict], memory: float | None = None) -> tuple[float, float]:
    """(compute, memory) efficiency minimising the RMS log error of ``rows``; ``memory`` given: only the
    compute efficiency is fitted (one memory efficiency per host, shared by its engines)."""
    flops = np.array([r["cost"].total_flops for r in rows], dtype=np.float64)
    moved = np.array([r["cost"].moved_bytes() for r in rows], dtype=np.float64)
    measured = np.array([r["measured_s"] for r in rows])
    best = (np.inf, 0.15, 0.5)
    for eff in np.geomspace(0.01, 1.0, 120):
        compute = flops / (profile.cpu.peak_gflops * 1e9 * eff)
        for mem in np.geomspace(0.02, 8.0, 120) if memory is None else (memory,):
            estimate = compute + moved / (profile.memory.bandwidth_gbs * 1e9 * mem)
            rms = float(np.sqrt(np.mean(np.log(estimate / measured) ** 2)))
            if rms < best[0]:
                best = (rms, eff, mem)
    return round(float(best[1]), 4), round(float(best[2]), 4)


def calibrate_host(models: list[str], methods: list[str], batch: int, shape: tuple,
                   steps: Steps | None = None, engines: tuple[str, ...] = ("torch",)) -> tuple[DeviceProfile, list[dict]]:
    """Measure every model x method (x engine: onnxruntime for edge models only) here, fit the host's
    efficiency per engine (``torch_cpu`` with the memory efficiency, then ``onnxruntime_cpu`` sharing it), and
    report errors before and after (``steps``: told each measurement as it starts)."""
    steps = steps or (lambda what: None)
    host = detect_host()
    prior = host.efficiency
    steps(f"memory bandwidth of {host.display_name} (numpy copy of 256 MiB)")
    host.memory.bandwidth_gbs = round(measure_bandwidth_gbs(), 1)
    host.sources["bandwidth_gbs"] = "measured: numpy copy of 256 MiB (device-profile --measure)"
    steps(f"fp32 peak of {host.display_name} (2048x2048 sgemm on every thread)")
    host.cpu.peak_gflops = round(measure_peak_gflops(host.cpu.cores), 1)
    host.sources["peak_gflops"] = (f"measured: best 2048x2048 fp32 sgemm on {host.cpu.cores} threads "
                                   "(device-profile --measure)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="device-profile-") as tmp:
        for model in models:
            program = None
            for engine in engines:
                if engine == "onnxruntime":
                    if onnx_problem(model):
                        continue
                    steps(f"{model}, batch {batch}, input {_shape(shape)}: compiling its edge program for "
                          "onnxruntime (a separate process)")
                    program, _ = compile_for_profile(model, batch, shape, tmp)
                for method in methods:
                    steps(f"{model} {method}, batch {batch}, input {_shape(_input_for(model, shape))}: FLOPs, then the "
                          f"step time on {host.display_name}" + ("" if engine == "torch" else " (onnxruntime)"))
                    cost = model_cost(model, method, batch, _input_for(model, shape))
                    if engine == "torch":
                        measured = measure_latency(model, method, batch, _input_for(model, shape))["median_s"]
                    else:
                        measured = measure_program(program, method, batch, threads=_threads())["median_s"]
                    rows.append({"model": model, "method": method, "engine": engine, "flops": cost.total_flops,
                                 "measured_s": measured, "cost": cost,
                                 "uncalibrated_s": estimate_latency(cost, host, ENGINE_RUNTIMES[engine])["estimate_s"]})
                    logger.info("%s %s (%s): %.1f ms measured", model, method, engine, measured * 1e3)
    by_engine = {e: [r for r in rows if r["engine"] == e] for e in engines}
    torch_cpu, memory, onnx_cpu, fitted = prior.torch_cpu, None, None, []
    if by_engine.get("torch"):
        torch_cpu, memory = _fit(host, by_engine["torch"])
        fitted.append(f"torch_cpu and memory over {len(by_engine['torch'])} torch steps")
    if by_engine.get("onnxruntime"):
        onnx_cpu, memory = _fit(host, by_engine["onnxruntime"], memory)
        fitted.append(f"onnxruntime_cpu over {len(by_engine['onnxruntime'])} onnxruntime steps"
                      + (" (memory: the torch fit's)" if by_engine.get("torch") else " and memory"))
    if not rows:
        raise ConfigError(f"nothing to measure: no edge model among {', '.join(models)} for --engine onnxruntime")
    host.efficiency = replace(prior, torch_cpu=torch_cpu, onnxruntime_cpu=onnx_cpu,
                              memory=prior.memory if memory is None else memory)
    host.calibrated = True
    errors = []
    for r in rows:
        calibrated = estimate_latency(r.pop("cost"), host, ENGINE_RUNTIMES[r["engine"]])["estimate_s"]
        r.update(calibrated_s=calibrated, uncalibrated_error=r["uncalibrated_s"] / r["measured_s"] - 1,
                 calibrated_error=calibrated / r["measured_s"] - 1)
        errors.append(abs(r["calibrated_error"]))
    host.uncertainty = round(max(errors), 3)
    host.sources["efficiency"] = (f"fitted: compute and memory efficiency minimising the RMS log error "
                                  f"({'; '.join(fitted)}; batch {batch}, input {'x'.join(map(str, shape))})"
                                  + ("" if by_engine.get("torch") else "; torch_cpu: prior, not measured"))
    return host, rows


def cmd_measure(batch: int, shape: tuple, methods: list[str], save: str | None, as_json: bool,
                engines: tuple[str, ...] = ("torch",)) -> int:
    models = [m for m in list_models()]
    edge_models = [m for m in models if not onnx_problem(m)] if "onnxruntime" in engines else []
    total = 2 + len(models) * len(methods) * ("torch" in engines) + len(edge_models) * (1 + len(methods))
    steps = Steps("device-profile --measure", total)
    host, rows = calibrate_host(models, methods, batch, shape, steps, engines)
    steps.finish()
    if save:
        Path(save).write_text(yaml.safe_dump(asdict(host), sort_keys=False))
    if as_json:
        print(json.dumps({"profile": asdict(host), "rows": rows}, indent=2))
        return 0
    eff = host.efficiency
    print(f"{host.display_name}: peak {host.cpu.peak_gflops:.0f} GFLOP/s, bandwidth {host.memory.bandwidth_gbs} GB/s, "
          f"fitted efficiency: compute {eff.torch_cpu:.3f} (torch)"
          + (f", {eff.onnxruntime_cpu:.3f} (onnxruntime)" if eff.onnxruntime_cpu is not None else "")
          + f", memory {eff.memory:.3f}")
    print(f"{'model':<18} {'method':<10} {'engine':<12} {'measured ms':>12} {'uncal. ms':>10} {'err':>7} "
          f"{'calib. ms':>10} {'err':>7}")
    for r in rows:
        print(f"{r['model']:<18} {r['method']:<10} {r['engine']:<12} {r['measured_s'] * 1e3:>12.1f} "
              f"{r['uncalibrated_s'] * 1e3:>10.1f} {100 * r['uncalibrated_error']:>6.0f}% {r['calibrated_s'] * 1e3:>10.1f} "
              f"{100 * r['calibrated_error']:>6.0f}%")
    return 0


def main(argv: list[str] | None = None) -> int:
    from edgefl_cli.logs import setup_logging

    argv = list(sys.argv[1:] if argv is None else argv)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--batch", type=positive_int, default=64, help="samples per step (default 64)")
    common.add_argument("--input", type=parse_shape, default=(3, 32, 32), help="CxHxW (default 3x32x32)")
    common.add_argument("--json", action="store_true", help="print the results as JSON")
    common.add_argument("--model-kwargs", type=parse_model_kwargs, default={},
                        help="model options as a YAML mapping, as in a run's model_kwargs, e.g. '{stem_stride: 2}'")
    common.add_argument("--log-level", default="WARNING")
    args = None
    try:
        if argv[:1] == ["compare"]:
            parser = argparse.ArgumentParser(prog="device-profile compare", parents=[common])
            parser.add_argument("models", nargs="+")
            args = parser.parse_args(argv[1:])
            setup_logging(args.log_level)
            return cmd_compare(args.models, args.batch, args.input, args.json, args.model_kwargs)
        usage_lines = "\n".join(line for line in __doc__.splitlines() if line.startswith("    device-profile"))
        parser = argparse.ArgumentParser(prog="device-profile", parents=[common], description=__doc__.splitlines()[0],
                                         epilog=f"forms (compare: FLOPs and memory of several models side by side):"
                                                f"\n{usage_lines}",
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("model", nargs="?", help=f"one of: {', '.join(list_models())}")
        parser.add_argument("--device", action="append", default=[], help=f"profile name or YAML path; known: "
                                                                         f"{', '.join(list_profiles())}")
        parser.add_argument("--all-devices", action="store_true", help="every known profile")
        parser.add_argument("--method", action="append", choices=METHODS, default=None,
                            help="inference or backprop step; repeatable (default: both)")
        parser.add_argument("--plot", default=None, help="write a PNG of per-device latency estimates")
        parser.add_argument("--measure", action="store_true",
                            help="with MODEL: also measure step time and peak memory here; alone: measure every "
                                 "zoo model here and calibrate this host's profile")
        parser.add_argument("--save-profile", default=None, help="with --measure: write the calibrated host profile")
        parser.add_argument("--engine", choices=(*ENGINES, "both"), default="torch",
                            help="whose step: torch, onnxruntime (a device on engine: onnxruntime; --measure compiles "
                                 "each edge model first, tens of seconds each) or both (default: torch)")
        args = parser.parse_args(argv)
        setup_logging(args.log_level if not args.measure else "INFO")
        methods = args.method or list(METHODS)
        engines = ENGINES if args.engine == "both" else (args.engine,)
        if args.measure and not args.model:
            return cmd_measure(args.batch, args.input, methods, args.save_profile, args.json, engines)
        if not args.model:
            parser.error("give a MODEL, 'compare MODEL ...', or --measure")
        if args.model not in list_models():
            raise ConfigError(f"unknown model {args.model!r}; known: {', '.join(list_models())}")
        devices = list_profiles() if args.all_devices else (args.device or ["host"])
        return cmd_profile(args.model, devices, methods, args.batch, args.input, args.json, args.plot, args.measure,
                           engines, args.model_kwargs)
    except (ConfigError, ValueError) as e:
        print(f"device-profile: error: {e}", file=sys.stderr)
        return 2
    except TypeError as e:
        if args is None or not args.model_kwargs:  # only a model option's type error is the user's
            raise
        print(f"device-profile: error: --model-kwargs {args.model_kwargs}: {str(e).splitlines()[0]}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # the edge program's compile or its onnxruntime measurement failed
        print(f"device-profile: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
