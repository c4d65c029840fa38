"""The quickstart end to end: wall time, CPU-seconds and accuracy of ``make quickstart``'s job, over several
runs, variants alternated so that the host's drift hits each alike.

Each run is ``edgefl-sim --config configs/quickstart.yaml`` (over MQTT, the embedded mosquitto, 4 agent
processes) in a fresh process, with the variant's ``--set`` overrides. CPU-seconds are user + system time
of the whole process tree (``RUSAGE_CHILDREN``: the simulator waits for its runtime, agents and broker).
The issue's bars are printed beside the medians: wall <= 1.25 x CPU-seconds / cores, and a median wall
of at most 240 s at the accuracy of main before the change +- 0.3 points.

    python -m bench.quickstart --runs 3 --variants fp32 bf16 --out docs/bench/quickstart_runs
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.plots import save_figure

VARIANTS = {
    "fp32": [],  # the quickstart as shipped
    "bf16": ["--set", "server.precision=bf16"],
}
WALL_BAR_S = 240.0
RATIO_BAR = 1.25


def children_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_once(config: str, overrides: list[str], out: Path) -> dict:
    """One quickstart; its wall seconds, CPU-seconds of the process tree and the report's accuracies.

    Raises RuntimeError (naming the log) when the run fails."""
    sim = Path(sys.executable).with_name("edgefl-sim")
    cmd = [str(sim), "--config", config, "--out", str(out), *overrides]
    cpu0, wall0 = children_cpu_s(), time.perf_counter()
    with open(out.with_suffix(".log"), "w") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
    wall, cpu = time.perf_counter() - wall0, children_cpu_s() - cpu0
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}; see {out.with_suffix('.log')}")
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": wall, "cpu_s": cpu, "final_test_accuracy": report["final"]["test_accuracy"],
            "round_accuracies": [r.get("test_accuracy") for r in report["rounds"]],
            "server_seconds": [r["server"]["seconds"] for r in report["rounds"]]}


def plot(result: dict, path: Path) -> None:
    """Each run's wall time per variant, with the 240 s bar and the CPU-seconds / cores floor."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (name, runs) in enumerate(result["runs"].items()):
        ax.scatter([i] * len(runs), [r["wall_s"] for r in runs], label=f"{name}: wall per run")
        ax.scatter([i] * len(runs), [r["cpu_s"] / result["cores"] for r in runs], marker="_", s=400,
                   color="gray")
    ax.axhline(WALL_BAR_S, color="k", ls="--", label=f"the issue's bar ({WALL_BAR_S:.0f} s)")
    ax.set_xticks(range(len(result["runs"])), list(result["runs"]))
    ax.set_ylabel("seconds (gray: CPU-seconds / cores)")
    ax.set_title(f"quickstart, {result['cores']} cores")
    ax.legend(fontsize=8)
    save_figure(fig, path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quickstart.yaml")
    parser.add_argument("--runs", type=int, default=3, help="runs per variant")
    parser.add_argument("--variants", nargs="+", default=["fp32"], choices=sorted(VARIANTS))
    parser.add_argument("--baseline-accuracy", type=float, default=0.8658,
                        help="the quickstart's accuracy on main before issue 16 (docs/BENCHMARKS.md)")
    parser.add_argument("--out", default="docs/bench/quickstart_runs")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    runs: dict[str, list[dict]] = {v: [] for v in args.variants}
    with tempfile.TemporaryDirectory(prefix="bench-quickstart-") as tmp:
        for i in range(args.runs):
            for variant in args.variants:  # alternated: drift in the host's speed hits each alike
                row = run_once(args.config, VARIANTS[variant], Path(tmp) / f"{variant}-{i}")
                runs[variant].append(row)
                print(f"run {i + 1}/{args.runs} {variant}: wall {row['wall_s']:.0f} s, {row['cpu_s']:.0f} CPU-s "
                      f"(wall / (CPU-s / {cores} cores) {row['wall_s'] / (row['cpu_s'] / cores):.2f}), "
                      f"accuracy {row['final_test_accuracy']:.4f}", flush=True)
    first = args.variants[0]
    summary = {}
    for variant, rows in runs.items():
        wall = statistics.median(r["wall_s"] for r in rows)
        cpu = statistics.median(r["cpu_s"] for r in rows)
        accuracy = statistics.median(r["final_test_accuracy"] for r in rows)
        summary[variant] = {
            "median_wall_s": wall, "median_cpu_s": cpu, "wall_over_cpu_per_core": wall / (cpu / cores),
            "median_final_test_accuracy": accuracy,
            "wall_vs_" + first: wall / statistics.median(r["wall_s"] for r in runs[first]),
            "meets_wall_bar": wall <= WALL_BAR_S, "meets_ratio_bar": wall / (cpu / cores) <= RATIO_BAR,
            "meets_accuracy_bar": abs(accuracy - args.baseline_accuracy) <= 0.003}
    print(f"\n{'variant':8s} {'wall s':>7s} {'CPU-s':>7s} {'wall/(CPU/cores)':>17s} {'accuracy':>9s} "
          f"{'vs ' + first:>9s}  bars (wall <= {WALL_BAR_S:.0f} s, ratio <= {RATIO_BAR}, accuracy +-0.3 pt)")
    for variant, s in summary.items():
        bars = ", ".join(f"{name} {'met' if s['meets_' + name + '_bar'] else 'NOT met'}"
                         for name in ("wall", "ratio", "accuracy"))
        print(f"{variant:8s} {s['median_wall_s']:7.0f} {s['median_cpu_s']:7.0f} {s['wall_over_cpu_per_core']:17.2f} "
              f"{s['median_final_test_accuracy']:9.4f} {s['wall_vs_' + first]:8.2f}x  {bars}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "cores": cores, "runs": runs, "summary": summary}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    plot(result, out / "quickstart.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
