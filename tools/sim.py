"""``edgefl-sim``: run a FedGKT experiment end to end and write ``report.json`` plus plots.

``--transport mqtt`` (the default) starts a private mosquitto on a free loopback port (or uses
``--broker``), one ``cloud-runtime`` process and one ``edge-agent`` process per device, each with
its own data partition, and shuts everything down at the end. ``--transport memory`` runs every
device and the server in this process, through the same trainer classes.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from cloud_runtime.config import ExperimentConfig, load_config
from cloud_runtime.server_trainer import GKTServer
from edge_sdk.client import EdgeClient
from edgefl_core.config import ConfigError
from edgefl_core.data import federated
from edgefl_core.data.datasets import DatasetError
from model_zoo import create_model
from tools.cli_logging import setup_logging
from tools.mosquitto import EmbeddedMosquitto
from tools.report import plot_accuracy, plot_bytes, plot_divergence, write_json

logger = logging.getLogger("edgefl.sim")


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def through_codec(upload, codec: str):
    """Send an upload through the wire encoding and back (what the runtime sees over MQTT)."""
    from edge_sdk import protocol as P
    arrays, meta = P.upload_to_arrays(upload, codec)
    blob = P.pack_arrays(arrays)
    decoded = P.arrays_to_upload(P.unpack_arrays(blob), meta, upload.device_id, upload.round)
    decoded.metrics = {"wire_bytes": len(blob), "raw_fp32_bytes": meta["raw_fp32_bytes"]}
    return decoded


def run_in_memory(cfg: ExperimentConfig, out_dir: Path, wire_codec: str | None = None) -> dict:
    """FedGKT with sync rounds in one process; returns the report (also written to ``out_dir``).

    ``wire_codec`` passes every feature upload through that codec's encode/decode (the MQTT path
    without the broker), which is how ``bench/codecs.py`` measures a codec's accuracy cost.
    """
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
                "wire_codec": wire_codec,
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
            server.ingest(through_codec(upload, wire_codec) if wire_codec else upload)
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
        if cfg.fedgkt.average_extractors:  # FedAvg of the tiny extractors, weighted by local samples
            from cloud_runtime.aggregation import average_torch_states
            average = average_torch_states([c.extractor_state() for c in clients], [len(c.train_set) for c in clients])
            for client in clients:
                client.load_extractor(average)
        # 3. evaluation: each device's test images through its extractor and the server model
        if (round_ + 1) % cfg.run.eval_every == 0 or round_ == cfg.run.rounds - 1:
            eval_start = time.perf_counter()
            tests = [c.extract("test", round_) for c in clients]
            evaluation = server.evaluate([through_codec(t, wire_codec) for t in tests] if wire_codec else tests)
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


def _spawn(args: list[str], log_path: Path, echo: bool = False) -> subprocess.Popen:
    """Start a child process; its output goes to ``log_path`` (and to our stderr when ``echo``)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(log_path, "wb")
    if not echo:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def relay():
        for line in proc.stdout:  # type: ignore[union-attr]
            log.write(line)
            log.flush()
            sys.stderr.write(line.decode(errors="replace"))
        log.close()
    threading.Thread(target=relay, daemon=True).start()
    return proc


def _stop(proc: subprocess.Popen, grace: float) -> None:
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def write_deployment(cfg: ExperimentConfig, out_dir: Path, broker_url: str) -> tuple[Path, list[Path], dict]:
    """Partition the data and write one runtime config and one agent config per device."""
    data = federated.prepare(cfg.data, cfg.run.devices, cfg.run.seed, out_dir)
    run_id = "".join(c if c.isalnum() or c in "-_" else "-" for c in cfg.run.name) or "run"
    dep = cfg.deployment
    eval_ids = out_dir / "eval_sample_ids.json"
    eval_ids.write_text(json.dumps({"train": [], "test": data.test_all.sample_ids.tolist()}))
    runtime_cfg = {
        "run_id": run_id, "algorithm": cfg.algorithm, "fedavg": asdict(cfg.fedavg), "fedgkt": asdict(cfg.fedgkt),
        "eval_data": {"dataset": cfg.data.dataset, "path": cfg.data.path, "ids_file": str(eval_ids)},
        "broker": {"url": broker_url}, "server": asdict(cfg.server), "mode": dep.mode,
        "rounds": cfg.run.rounds, "min_devices": cfg.run.devices, "expected_devices": cfg.run.devices,
        "registration_timeout_s": 300.0, "round_deadline_s": dep.round_deadline_s, "quorum": dep.quorum,
        "eval_every": cfg.run.eval_every, "max_staleness": dep.max_staleness,
        "state_dir": str(out_dir / "runtime"), "threads": cfg.run.threads, "seed": cfg.run.seed}
    runtime_path = out_dir / "runtime.yaml"
    runtime_path.write_text(yaml.safe_dump(runtime_cfg, sort_keys=False))
    agent_paths = []
    for d in range(cfg.run.devices):
        device = f"dev{d}"
        device_dir = out_dir / "agents" / device
        device_dir.mkdir(parents=True, exist_ok=True)
        ids_file = device_dir / "sample_ids.json"
        ids_file.write_text(json.dumps({"train": data.train[d].sample_ids.tolist(),
                                        "test": data.test[d].sample_ids.tolist()}))
        agent_cfg = {
            "device_id": device, "run_id": run_id, "algorithm": cfg.algorithm, "broker": {"url": broker_url},
            "data": {"dataset": cfg.data.dataset, "path": cfg.data.path, "ids_file": str(ids_file)},
            "edge": asdict(cfg.edge), "upload": {"codec": dep.codec, "chunk_bytes": dep.chunk_bytes,
                                                         "model_codec": cfg.fedavg.model_codec},
            "state_dir": str(device_dir / "state"), "threads": dep.agent_threads, "seed": cfg.run.seed + d,
            "profile": dep.device_profiles[d % len(dep.device_profiles)] if dep.device_profiles else "host"}
        path = device_dir / "agent.yaml"
        path.write_text(yaml.safe_dump(agent_cfg, sort_keys=False))
        agent_paths.append(path)
    counts = {f"dev{d}": data.train_class_counts[d].tolist() for d in range(cfg.run.devices)}
    return runtime_path, agent_paths, counts


def run_over_mqtt(cfg: ExperimentConfig, out_dir: Path, broker_url: str | None = None,
                  log_level: str = "INFO") -> dict:
    """Real processes over a real broker: one cloud-runtime, one edge-agent per device."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("runtime", "agents", "broker", "logs"):  # a new simulation, not a resume of the last one
        if (out_dir / stale).exists():
            shutil.rmtree(out_dir / stale)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    logs = out_dir / "logs"
    logs.mkdir(exist_ok=True)
    broker = None if broker_url else EmbeddedMosquitto(workdir=out_dir / "broker").start()
    url = broker_url or broker.url  # type: ignore[union-attr]
    procs: list[subprocess.Popen] = []
    start = time.perf_counter()
    try:
        runtime_path, agent_paths, class_counts = write_deployment(cfg, out_dir, url)
        logger.info("deploying over %s: 1 cloud-runtime + %d edge-agent processes (logs in %s)", url,
                    len(agent_paths), logs)
        runtime = _spawn([sys.executable, "-m", "cloud_runtime.service", "serve", "--config", str(runtime_path),
                          "--log-level", log_level], logs / "runtime.log", echo=True)
        procs.append(runtime)
        for path in agent_paths:
            procs.append(_spawn([sys.executable, "-m", "edge_sdk.agent", "--config", str(path),
                                 "--log-level", log_level], logs / f"{path.parent.name}.log"))
        try:
            code = runtime.wait(cfg.deployment.timeout_s)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"the run did not finish within {cfg.deployment.timeout_s:.0f}s (see {logs})") from None
        if code != 0:
            raise RuntimeError(f"cloud-runtime exited with {code} (see {logs / 'runtime.log'})")
        for proc in procs[1:]:
            _stop(proc, grace=30)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            _stop(proc, grace=10)
        if broker is not None:
            broker.stop()
    report = json.loads((out_dir / "runtime" / "report.json").read_text())
    report["run"].update(name=cfg.run.name, codec=cfg.deployment.codec, broker=url if broker_url else "embedded",
                         edge_model=cfg.edge.model, agents=len(agent_paths),
                         agent_exit_codes=[p.returncode for p in procs[1:]])
    for device, counts in class_counts.items():
        report["devices"].setdefault(device, {})["class_counts"] = counts
    report["final"]["wall_seconds"] = time.perf_counter() - start
    write_json(out_dir / "report.json", report)
    plot_accuracy(report, out_dir / "accuracy.png")
    plot_bytes(report, out_dir / "uploads.png")
    plot_divergence(report, out_dir / "divergence.png")
    final = report["final"]
    logger.info("final test accuracy %s over MQTT in %.0fs; upload %.1f MB, %.1fx smaller than fp32; report: %s",
                final.get("test_accuracy"), final["wall_seconds"], final["bytes_up"] / 1e6,
                final["upload_compression_ratio"], out_dir / "report.json")
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgefl-sim", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="experiment YAML (e.g. configs/quickstart.yaml)")
    parser.add_argument("--out", default="runs/latest", help="output directory for report.json and plots")
    parser.add_argument("--transport", choices=["mqtt", "memory"], default="mqtt",
                        help="mqtt: real processes over mosquitto (default); memory: everything in this process")
    parser.add_argument("--broker", default=None, metavar="mqtt://host:port",
                        help="use this broker instead of starting a private mosquitto")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key, e.g. --set edge.lr=0.05 (repeatable)")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.transport == "memory":
            if cfg.algorithm != "fedgkt":
                raise ConfigError(f"algorithm {cfg.algorithm!r} runs over MQTT only (drop --transport memory)")
            report = run_in_memory(cfg, Path(args.out))
        else:
            report = run_over_mqtt(cfg, Path(args.out), args.broker, args.log_level)
    except (ConfigError, DatasetError, FileNotFoundError, RuntimeError) as e:
        logger.error("%s", e)
        return 2
    print(f"final test accuracy: {report['final'].get('test_accuracy')}  report: {Path(args.out) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
