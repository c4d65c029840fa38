"""``edgefl-sim``: run a FedGKT experiment end to end and write ``report.json`` plus plots.

``--transport memory`` runs every device and the server in this process (the trainers are the
same classes the edge agent and cloud runtime use); messages are the typed ones from
``edge_sdk.messages``.
"""
from __future__ import annotations

import argparse
import logging
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import yaml

from cloud_runtime.config import ExperimentConfig, load_config
from cloud_runtime.server_trainer import GKTServer
from edge_sdk.client import EdgeClient
from edge_sdk.config import ConfigError
from edge_sdk.data import federated
from edge_sdk.data.datasets import DatasetError
from model_zoo import create_model
from tools.cli_logging import setup_logging
from tools.report import plot_accuracy, write_json

logger = logging.getLogger("edgefl.sim")


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def run_in_memory(cfg: ExperimentConfig, out_dir: Path) -> dict:
    """FedGKT with sync rounds in one process; returns the report (also written to ``out_dir``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    torch.manual_seed(cfg.run.seed)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))

    data = federated.prepare(cfg.data, cfg.run.devices, cfg.run.seed, out_dir)
    in_channels = data.image_shape[0]
    clients = []
    for d in range(cfg.run.devices):
        model = create_model(cfg.edge.model, num_classes=data.num_classes, in_channels=in_channels,
                             **cfg.edge.model_kwargs)
        clients.append(EdgeClient(f"dev{d}", model, data.train[d], data.test[d], cfg.edge,
                                  stats_name=data.stats_name, seed=cfg.run.seed + d))
    server_model = create_model(cfg.server.model, num_classes=data.num_classes,
                                feature_channels=clients[0].model.feature_channels, **cfg.server.model_kwargs)
    server = GKTServer(server_model, cfg.server, data.num_classes, seed=cfg.run.seed)

    report: dict = {
        "run": {"name": cfg.run.name, "transport": "memory", "algorithm": "fedgkt", "torch": torch.__version__,
                "threads": torch.get_num_threads(), "host": platform.node(), "started": time.time(),
                "edge_model": cfg.edge.model, "edge_params": _params(clients[0].model),
                "server_model": cfg.server.model, "server_params": _params(server_model)},
        "devices": {c.device_id: {"train_samples": len(c.train_set), "test_samples": len(c.test_set),
                                  "class_counts": data.train_class_counts[i].tolist(), "trainer": cfg.edge.trainer}
                    for i, c in enumerate(clients)},
        "rounds": [],
    }
    logger.info("FedGKT %s -> %s, %d devices, %d rounds, %d train / %d test samples",
                cfg.edge.model, cfg.server.model, len(clients), cfg.run.rounds,
                sum(len(c.train_set) for c in clients), len(data.test_all))
    run_start = time.perf_counter()
    evaluation = None
    for round_ in range(cfg.run.rounds):
        round_start = time.perf_counter()
        row: dict = {"round": round_, "edge": {}}
        # 1. every device trains locally (KD to last round's soft labels), then uploads its features
        for client in clients:
            stats = client.train_round(round_)
            upload = client.extract("train", round_)
            server.ingest(upload)
            row["edge"][client.device_id] = asdict(stats)
            logger.info("round %d %s: loss %.3f (ce %.3f kd %.3f) acc %.3f, %d samples at %.0f/s, KD on %.0f%%",
                        round_, client.device_id, stats.loss, stats.ce, stats.kd, stats.train_accuracy,
                        stats.samples, stats.samples_per_s, 100 * stats.kd_coverage)
        # 2. the server trains on all features and answers each device with its soft labels
        replies, server_stats = server.train_round(round_)
        row["server"] = asdict(server_stats)
        logger.info("round %d server: loss %.3f acc %.3f, %d samples at %.0f/s, lr %.4g", round_, server_stats.loss,
                    server_stats.train_accuracy, server_stats.samples, server_stats.samples_per_s, server_stats.lr)
        for client in clients:
            client.receive(replies[client.device_id])
        # 3. evaluation: each device's test images through its extractor and the server model
        if (round_ + 1) % cfg.run.eval_every == 0 or round_ == cfg.run.rounds - 1:
            eval_start = time.perf_counter()
            evaluation = server.evaluate([c.extract("test", round_) for c in clients])
            row.update(test_accuracy=evaluation.accuracy, test_loss=evaluation.loss,
                       mean_device_accuracy=evaluation.mean_device_accuracy, per_device=evaluation.per_device,
                       eval_seconds=time.perf_counter() - eval_start)
        else:
            row.update(test_accuracy=None)
        row["seconds"] = time.perf_counter() - round_start
        report["rounds"].append(row)
        logger.info("round %d done in %.1fs%s", round_, row["seconds"],
                    f": test accuracy {row['test_accuracy']:.4f}" if row["test_accuracy"] is not None else "")
        write_json(out_dir / "report.json", report)  # partial report survives an interrupted run

    assert evaluation is not None
    accuracies = [r["test_accuracy"] for r in report["rounds"] if r["test_accuracy"] is not None]
    report["final"] = {"test_accuracy": evaluation.accuracy, "mean_device_accuracy": evaluation.mean_device_accuracy,
                       "best_test_accuracy": max(accuracies), "test_samples": evaluation.samples,
                       "rounds": cfg.run.rounds, "total_seconds": time.perf_counter() - run_start}
    for device, result in evaluation.per_device.items():
        report["devices"][device].update(final_test_accuracy=result["accuracy"],
                                         final_edge_model_accuracy=result["edge_model_accuracy"])
    write_json(out_dir / "report.json", report)
    plot_accuracy(report, out_dir / "accuracy.png")
    logger.info("final test accuracy %.4f on %d test samples (mean per device %.4f) in %.0fs; report: %s",
                evaluation.accuracy, evaluation.samples, evaluation.mean_device_accuracy,
                report["final"]["total_seconds"], out_dir / "report.json")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgefl-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML (e.g. configs/quickstart.yaml)")
    parser.add_argument("--out", default="runs/latest", help="output directory for report.json and plots")
    parser.add_argument("--transport", choices=["memory"], default="memory",
                        help="memory: every device and the server in this process")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set edge.lr=0.05 (repeatable)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = load_config(args.config, args.overrides)
        report = run_in_memory(cfg, Path(args.out))
    except (ConfigError, DatasetError) as e:
        logger.error("%s", e)
        return 2
    print(f"final test accuracy: {report['final']['test_accuracy']:.4f}  report: {Path(args.out) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
