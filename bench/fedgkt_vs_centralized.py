"""FedGKT vs centralized training on Fashion-MNIST (the structure of FedGKT's Table 1).

Rows: centralized ResNet-56, centralized ResNet-8, FedGKT ResNet-8 -> ResNet-55 with IID and
Dirichlet(alpha) partitions. Every row sees the same training subset; the server of FedGKT makes one
pass over all features per round, so ``--epochs`` centralized epochs and ``--epochs`` FedGKT rounds
spend the same number of large-model sample passes.

    python bench/fedgkt_vs_centralized.py --train-subset 16000 --epochs 6 --stem-stride 2 \
        --out docs/bench/fedgkt_vs_centralized

Prints a Markdown table and writes ``results.json`` / ``results.md`` under ``--out``.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_runtime.config import load_config  # noqa: E402
from edge_sdk.data.batching import ArrayLoader  # noqa: E402
from edgefl_core.data.datasets import load_dataset  # noqa: E402
from edgefl_core.data.federated import stratified_subset  # noqa: E402
from edge_sdk.data.transforms import Augment  # noqa: E402
from model_zoo import create_model  # noqa: E402
from edgefl_cli.logs import setup_logging  # noqa: E402
from edgefl_cli.simulation import run_in_memory  # noqa: E402

logger = logging.getLogger("bench.fedgkt_vs_centralized")


def train_centralized(model_name: str, train, test, epochs: int, stem_stride: int, seed: int) -> dict:
    torch.manual_seed(seed)
    model = create_model(model_name, in_channels=train.image_shape[0], num_classes=train.num_classes,
                         stem_stride=stem_stride).to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = ArrayLoader(train, 64, shuffle=True, augment=Augment(2, True), stats_name="fashion_mnist", seed=seed)
    history, start = [], time.perf_counter()
    for epoch in range(epochs):
        model.train()
        for batch in loader:
            loss = torch.nn.functional.cross_entropy(model(batch.images), batch.labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        accuracy = evaluate(model, test)
        history.append(accuracy)
        logger.info("%s epoch %d: test accuracy %.4f (%.0fs)", model_name, epoch, accuracy, time.perf_counter() - start)
    return {"test_accuracy": history[-1], "best_test_accuracy": max(history), "history": history,
            "seconds": time.perf_counter() - start,
            "params": sum(p.numel() for p in model.parameters())}


@torch.inference_mode()
def evaluate(model, test) -> float:
    model.eval()
    correct = 0
    for batch in ArrayLoader(test, 500, stats_name="fashion_mnist"):
        correct += int((model(batch.images).argmax(1) == batch.labels).sum())
    return correct / len(test)


def run_fedgkt(partition: str, args) -> dict:
    overrides = [f"run.rounds={args.epochs}", f"run.devices={args.devices}", f"run.seed={args.seed}",
                 f"data.train_subset={args.train_subset}", f"data.partition={partition}", f"data.alpha={args.alpha}",
                 f"edge.model_kwargs={{stem_stride: {args.stem_stride}}}", f"run.name=fedgkt-{partition}"]
    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml", overrides)
    report = run_in_memory(cfg, Path(args.out) / f"fedgkt-{partition}")
    history = [r["test_accuracy"] for r in report["rounds"]]
    return {"test_accuracy": report["final"]["test_accuracy"], "best_test_accuracy": max(history),
            "history": history, "seconds": report["final"]["total_seconds"],
            "params": report["run"]["edge_params"], "server_params": report["run"]["server_params"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-subset", type=int, default=16000)
    parser.add_argument("--epochs", type=int, default=6, help="centralized epochs = FedGKT rounds")
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.5)
    parser.add_argument("--stem-stride", type=int, default=2, help="1 = FedML's exact models (3.5x slower server)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", nargs="*", default=None,
                        help="subset of rows: resnet56 resnet8 fedgkt-homo fedgkt-hetero")
    parser.add_argument("--out", default="docs/bench/fedgkt_vs_centralized")
    args = parser.parse_args()
    setup_logging("INFO")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    train = stratified_subset(load_dataset("fashion_mnist", "train"), args.train_subset, args.seed)
    test = load_dataset("fashion_mnist", "test")

    rows = {}
    wanted = args.only or ["resnet56", "resnet8", "fedgkt-homo", "fedgkt-hetero"]
    for name in wanted:
        if name in ("resnet56", "resnet8"):
            rows[f"centralized {name}"] = train_centralized(name, train, test, args.epochs, args.stem_stride, args.seed)
        else:
            partition = name.split("-")[1]
            label = "FedGKT resnet8_gkt -> resnet55_server, " + (
                "IID" if partition == "homo" else f"Dirichlet alpha={args.alpha}")
            rows[label] = run_fedgkt(partition, args)
        (out / "results.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))

    lines = [f"Fashion-MNIST, {args.train_subset} training images (stratified subset), all 10,000 test images; "
             f"{args.epochs} epochs/rounds; stem stride {args.stem_stride}; {torch.get_num_threads()} CPU threads.",
             "", "| method | test accuracy (last) | best | seconds | params of the model a device trains |", "| --- | ---: | ---: | ---: | ---: |"]
    for label, r in rows.items():
        lines.append(f"| {label} | {r['test_accuracy']:.4f} | {r['best_test_accuracy']:.4f} | {r['seconds']:.0f} | "
                     f"{r['params']:,} |")
    table = "\n".join(lines)
    (out / "results.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
