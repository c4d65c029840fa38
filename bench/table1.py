"""FedGKT's Table 1 structure on our stack: FedGKT vs FedAvg vs centralized, with edge FLOPs and bytes.

FedAvg rows run here over mosquitto (real processes, ``edgefl-sim --set algorithm=fedavg``);
FedGKT and centralized rows are read from ``bench/fedgkt_vs_centralized.py``'s results (same data,
devices, rounds and optimizer), and FedGKT's bytes from an MQTT quickstart report. Edge FLOPs per
round come from ``device_profiles`` (FlopCounterMode), bytes per round from the run reports.

    python bench/table1.py --rounds 6 --out docs/bench/table1 \
        --gkt-results docs/bench/fedgkt_vs_centralized/results.json --gkt-mqtt-report runs/quickstart/report.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_runtime.config import load_config  # noqa: E402
from device_profiles.profiler import model_cost  # noqa: E402
from edgefl_cli.logs import setup_logging  # noqa: E402
from edgefl_cli.simulation import run_over_mqtt  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def edge_flops_per_round(model: str, samples: int, test_samples: int, fedgkt: bool, **kwargs) -> float:
    """Training FLOPs for one local epoch, plus (FedGKT) the extraction passes over train and test data."""
    train = model_cost(model, "backprop", 64, (1, 28, 28), optimizer="adam", **kwargs)
    flops = samples * train.train_flops_per_sample
    if fedgkt:
        infer = model_cost(model, "inference", 64, (1, 28, 28), **kwargs)
        flops += (samples + test_samples) * infer.total_flops / infer.batch
    return flops


def run_fedavg(name: str, args, *extra: str) -> dict:
    overrides = ["algorithm=fedavg", "edge.model=resnet56", f"run.rounds={args.rounds}",
                 f"data.train_subset={args.train_subset}", f"run.name={name}", *extra]
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", overrides)
    report = run_over_mqtt(cfg, Path(args.out) / name, log_level="WARNING")
    rounds = report["rounds"]
    return {"test_accuracy": report["final"]["test_accuracy"], "best_test_accuracy": report["final"]["best_test_accuracy"],
            "history": [r["test_accuracy"] for r in rounds], "seconds": report["final"]["wall_seconds"],
            "bytes_up_per_round": report["final"]["bytes_up"] / len(rounds),
            "bytes_down_per_round": report["final"]["bytes_down"] / len(rounds),
            "mean_divergence_by_round": [sum(r["divergence"].values()) / len(r["divergence"]) for r in rounds],
            "divergence_last_round": rounds[-1]["divergence"], "config": overrides}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--train-subset", type=int, default=16000)
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--width-rounds", type=int, default=3, help="rounds of the width-variant FedAvg runs")
    parser.add_argument("--gkt-results", default="docs/bench/fedgkt_vs_centralized/results.json")
    parser.add_argument("--gkt-mqtt-report", default="runs/quickstart/report.json")
    parser.add_argument("--out", default="docs/bench/table1")
    args = parser.parse_args()
    setup_logging("INFO")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    per_device = args.train_subset // args.devices
    test_per_device = 10_000 // args.devices
    rows = {
        "FedAvg ResNet-56, IID": run_fedavg("fedavg-iid", args),
        f"FedAvg ResNet-56, Dirichlet alpha={args.alpha}": run_fedavg(
            "fedavg-hetero", args, "data.partition=hetero", f"data.alpha={args.alpha}"),
    }
    width = {w: run_fedavg(f"fedavg-width{w}", args, f"edge.model_kwargs={{stem_stride: 2, width: {w}}}",
                           f"run.rounds={args.width_rounds}") for w in (0.5, 1.0)}
    (out / "results.json").write_text(json.dumps({"args": vars(args), "fedavg": rows, "width": width}, indent=2))

    gkt = json.loads(Path(args.gkt_results).read_text())["rows"]
    gkt_bytes = json.loads(Path(args.gkt_mqtt_report).read_text())["final"]
    gkt_up = gkt_bytes["bytes_up"] / gkt_bytes["rounds"]
    gkt_down = gkt_bytes["bytes_down"] / gkt_bytes["rounds"]
    gkt_flops = edge_flops_per_round("resnet8_gkt", per_device, test_per_device, True, stem_stride=2)
    avg_flops = edge_flops_per_round("resnet56", per_device, 0, False, stem_stride=2)
    lines = [f"Fashion-MNIST, {args.train_subset} training images over {args.devices} devices, all 10,000 test "
             f"images, {args.rounds} rounds/epochs, stem stride 2, Adam 1e-3. Edge GFLOPs and MB are per device per "
             "round (FedGKT bytes: int8+zstd features of train and test data; FedAvg: fp16+zstd weights).", "",
             "| method | test accuracy | edge GFLOPs / round | up MB / round | down MB / round |",
             "| --- | ---: | ---: | ---: | ---: |"]
    for label, r in gkt.items():
        if label.startswith("FedGKT"):
            lines.append(f"| {label} | {r['test_accuracy']:.4f} | {gkt_flops / 1e9:.1f} | "
                         f"{gkt_up / args.devices / 1e6:.1f} | {gkt_down / args.devices / 1e6:.2f} |")
    for label, r in rows.items():
        lines.append(f"| {label} | {r['test_accuracy']:.4f} | {avg_flops / 1e9:.1f} | "
                     f"{r['bytes_up_per_round'] / args.devices / 1e6:.1f} | {r['bytes_down_per_round'] / args.devices / 1e6:.1f} |")
    for label, r in gkt.items():
        if label.startswith("centralized"):
            lines.append(f"| {label} | {r['test_accuracy']:.4f} | - | - | - |")
    lines += ["", f"Width variant (FedAvg ResNet-56, IID, {args.width_rounds} rounds): mean layer divergence per round",
              "", "| width | test accuracy | mean divergence by round |", "| ---: | ---: | --- |"]
    for w, r in width.items():
        lines.append(f"| {w} | {r['test_accuracy']:.4f} | {', '.join(f'{d:.4f}' for d in r['mean_divergence_by_round'])} |")
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
