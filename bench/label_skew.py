"""Label skew: FedGKT (plain and with extractor averaging) vs FedAvg under Dirichlet(alpha) partitions and IID,
over several seeds, to choose the default that device fleets (label-skewed by nature) should run.

    python -m bench.label_skew --seeds 0 1 2 --out docs/bench/label_skew

Every run is the quickstart (``configs/quickstart.yaml``: Fashion-MNIST, 4 devices, ResNet-8 -> ResNet-55,
6 rounds) on a smaller budget (``--train-subset`` images split among the devices, ``--test-subset`` test
images), in memory (the same runtime and agents as over MQTT). FedAvg (``fedavg``) trains ResNet-56 on the
devices with the quickstart's stride-2 stem, as in docs/AGGREGATION.md's Table 1: the same model as the
centralized baseline and as FedGKT's ResNet-8 stem + ResNet-55; ``fedavg-s1`` is ResNet-56 with FedML's stride-1
stem (a different model of 4x the FLOPs). Each finished run is saved to ``results.json`` at once and skipped when the
benchmark is started again: it resumes where it stopped. Prints a table of final test accuracy (mean and
standard deviation over seeds) and writes ``results.md`` and ``label_skew.png``.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time
from pathlib import Path

from bench.plots import save_figure

ROOT = Path(__file__).resolve().parents[1]
METHODS = {
    "fedgkt": ["fedgkt.average_extractors=false"],
    "fedgkt+avg": ["fedgkt.average_extractors=true"],
    # plain FedGKT with the server's forward under bf16 autocast (server.precision: bf16): its accuracy cost
    "fedgkt-bf16": ["fedgkt.average_extractors=false", "server.precision=bf16"],
    # FedAvg trains the whole ResNet-56 on the devices: with the quickstart's stride-2 stem, the model centralized
    # training and FedGKT's ResNet-8 stem + ResNet-55 make up (bench/fedgkt_vs_centralized.py --stem-stride 2)
    "fedavg": ["algorithm=fedavg", "edge.model=resnet56"],
    # and with FedML's stride-1 stem (4x the FLOPs on 28x28 images): a different, costlier model
    "fedavg-s1": ["algorithm=fedavg", "edge.model=resnet56", "edge.model_kwargs={}"],
}
PARTITIONS = {"iid": ["data.partition=homo"], "a1.0": ["data.partition=hetero", "data.alpha=1.0"],
              "a0.5": ["data.partition=hetero", "data.alpha=0.5"], "a0.1": ["data.partition=hetero", "data.alpha=0.1"]}


def run_one(method: str, partition: str, seed: int, args) -> dict:
    from cloud_runtime.config import load_config
    from edgefl_cli.simulation import run_in_memory
    name = f"{method}-{partition}-s{seed}"
    overrides = [*METHODS[method], *PARTITIONS[partition], f"run.seed={seed}", f"run.rounds={args.rounds}",
                 f"data.train_subset={args.train_subset}", f"data.test_subset={args.test_subset}",
                 f"run.name={name.replace('+', '-')}", "console.enabled=false", f"run.threads={args.threads}"]
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    start = time.perf_counter()
    report = run_in_memory(cfg, Path(args.runs) / name)
    history = [r["test_accuracy"] for r in report["rounds"]]
    return {"method": method, "partition": partition, "seed": seed, "test_accuracy": report["final"]["test_accuracy"],
            "best_test_accuracy": max(history), "history": history, "seconds": time.perf_counter() - start,
            "bytes_up": report["final"]["bytes_up"], "overrides": overrides}


def save(path: Path, results: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    os.replace(tmp, path)


def summary(results: dict) -> dict:
    """(method, partition) -> {mean, std, n} of final test accuracy."""
    cells: dict = {}
    for r in results.values():
        cells.setdefault((r["method"], r["partition"]), []).append(r["test_accuracy"])
    return {k: {"mean": statistics.mean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for k, v in cells.items()}


def table(cells: dict) -> list[str]:
    parts = [p for p in PARTITIONS if any(k[1] == p for k in cells)]
    lines = ["| method | " + " | ".join("IID" if p == "iid" else f"Dirichlet α={p[1:]}" for p in parts) + " |",
             "| --- |" + " ---: |" * len(parts)]
    for method in METHODS:
        row = [f"{cells[(method, p)]['mean']:.4f} ± {cells[(method, p)]['std']:.4f} (n={cells[(method, p)]['n']})"
               if (method, p) in cells else "–" for p in parts]
        lines.append(f"| {method} | " + " | ".join(row) + " |")
    return lines


def plot(cells: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    parts = [p for p in PARTITIONS if any(k[1] == p for k in cells)]
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(METHODS)
    for i, method in enumerate(METHODS):
        xs = [j + i * width for j, p in enumerate(parts) if (method, p) in cells]
        ys = [cells[(method, p)]["mean"] for p in parts if (method, p) in cells]
        es = [cells[(method, p)]["std"] for p in parts if (method, p) in cells]
        ax.bar(xs, ys, width, yerr=es, capsize=3, label=method)
    ax.set_xticks([j + width for j in range(len(parts))], ["IID" if p == "iid" else f"α={p[1:]}" for p in parts])
    ax.set(ylabel="final test accuracy (mean ± sd over seeds)", title="label skew: FedGKT vs FedAvg", ylim=(0, 1))
    ax.legend()
    save_figure(fig, path)


def main() -> None:
    from edgefl_cli.logs import setup_logging
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    parser.add_argument("--fedavg-partitions", nargs="+", default=["a0.5"], choices=list(PARTITIONS),
                        help="FedAvg (the slow baseline) only where the decision compares with it")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--train-subset", type=int, default=4000)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--out", default="docs/bench/label_skew")
    parser.add_argument("--runs", default="runs/label_skew", help="each run's report and plots")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads of the one process "
                        "(1 leaves a core free on a 2-core machine; the figures are a function of it)")
    args = parser.parse_args()
    setup_logging("WARNING")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    order = sorted(args.partitions, key=["a0.5", "iid", "a0.1", "a1.0"].index)  # the decision's cells first
    todo = [(m, p, s) for s in args.seeds for p in order for m in args.methods
            if (not m.startswith("fedavg") or p in args.fedavg_partitions) and f"{m}-{p}-s{s}" not in results]
    logging.getLogger("bench").warning("%d runs done, %d to go", len(results), len(todo))
    for i, (method, partition, seed) in enumerate(todo):
        r = run_one(method, partition, seed, args)
        results[f"{method}-{partition}-s{seed}"] = r
        save(path, results)
        print(f"[{i + 1}/{len(todo)}] {method:10s} {partition:5s} seed {seed}: {r['test_accuracy']:.4f} "
              f"(best {r['best_test_accuracy']:.4f}) in {r['seconds']:.0f} s", flush=True)
    cells = summary(results)
    lines = table(cells)
    print("\n".join(lines))
    command = (f"python -m bench.label_skew --seeds {' '.join(map(str, args.seeds))} --train-subset "
               f"{args.train_subset} --test-subset {args.test_subset} --rounds {args.rounds} --threads {args.threads}")
    (out / "results.md").write_text("\n".join([f"`{command}`", "", *lines, ""]))
    plot(cells, out / "label_skew.png")


if __name__ == "__main__":
    main()
