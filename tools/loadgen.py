"""Fleet load generator: many protocol-only agents (no training) against a real broker and the real runtime.

    python -m tools.loadgen --agents 1000 --workers 8 --out docs/bench/load
    python -m tools.loadgen --agents 1000 --workers 8 --ingest-workers 0 1 2 4 --trials 3 --out docs/bench/load_ingest

Each simulated agent is a real paho MQTT 5 client with a Last Will: it connects, registers, heartbeats,
uploads one small chunked feature transfer and waits for the runtime's ACK. The runtime is the real
:class:`CloudRuntime` (decode, reassemble, validate, sample-id ownership, ACK) over its own MQTT
connection; only its training rounds are not started. Reports the agents held connected at once,
messages/s through the runtime, upload -> ACK latency percentiles, and losses (uploads never
acknowledged, heartbeats never seen, rejections).

``--ingest-workers N ...`` runs the same load against a runtime with N ingest workers (real
``python -m edgefl_cli.ingest`` processes; the agents send their chunks on their shard's topic, as an agent
told ``ingest_shards`` does), each count in turn, ``--trials`` times alternately, and prints each count's
fleet messages per second (every message the agents sent, whoever handled it) and ACK latency as ratios to
the first count's, medians over trials.
"""
from __future__ import annotations

import argparse
import json
import logging
import multiprocessing as mp
import statistics
import threading
import time
from pathlib import Path

import numpy as np
import torch

from edge_sdk import protocol as P
from edge_sdk.messages import FeatureUpload

logger = logging.getLogger("edgefl.loadgen")
SAMPLES = 10           # per simulated device
FEATURES = (4, 5, 5)
CLASSES = 10


def _device_frames(run: str, device: str, index: int) -> list[bytes]:
    g = torch.Generator().manual_seed(index)
    ids = np.arange(index * SAMPLES, (index + 1) * SAMPLES, dtype=np.int64)
    upload = FeatureUpload(device, 0, "train", ids, torch.rand(SAMPLES, *FEATURES, generator=g),
                           torch.randn(SAMPLES, CLASSES, generator=g), torch.randint(0, CLASSES, (SAMPLES,), generator=g))
    arrays, meta = P.upload_to_arrays(upload, "int8")
    return P.chunk_transfer(P.pack_arrays(arrays), run=run, device=device, round_=0, meta=meta, max_chunk=512)


def _worker(url: str, run: str, first: int, count: int, heartbeats: int, ready, go, results, shards: int = 0) -> None:
    """One process driving ``count`` agents, each its own paho client and network thread. ``shards``: the run's
    ingest workers (chunks go on ``.../up/<k>``, the device's shard), 0 for none."""
    import paho.mqtt.client as mqtt

    from edgefl_core.transport.mqtt import BrokerAddress
    address = BrokerAddress.parse(url)
    topics = P.Topics(run)
    agents = []
    lock = threading.Lock()
    acks: dict[str, float] = {}
    connected = threading.Semaphore(0)

    for index in range(first, first + count):
        device = f"load{index:05d}"
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=device, protocol=mqtt.MQTTv5)
        client.will_set(topics.status(device), P.control_frame(P.STATUS, run=run, device=device, round_=-1,
                                                                 online=False), qos=1, retain=True)

        def on_connect(c, userdata, flags, rc, props, device=device):
            if not rc.is_failure:
                c.subscribe(topics.down(device), qos=1)
                connected.release()

        def on_message(c, userdata, msg, device=device):
            try:
                header, _ = P.decode_frame(msg.payload)
            except P.ProtocolError:
                return
            if header["type"] == P.ACK and header.get("data", {}).get("accepted"):
                with lock:
                    acks.setdefault(device, time.time())

        client.on_connect, client.on_message = on_connect, on_message
        client.connect_async(address.host, address.port, keepalive=30)
        client.loop_start()
        agents.append((index, device, client))
    deadline = time.monotonic() + 120
    held = 0
    while held < count and time.monotonic() < deadline:
        if connected.acquire(timeout=1):
            held += 1
    ready.put(held)
    go.wait()
    sent: dict[str, float] = {}
    messages = 0
    for index, device, client in agents:  # register everyone, then heartbeat, then upload
        client.publish(topics.up(device), P.control_frame(
            P.REGISTER, run=run, device=device, round_=-1, num_classes=CLASSES, feature_channels=FEATURES[0],
            train_samples=SAMPLES, test_samples=0, model="resnet8_gkt", profile="host"), qos=1)
    time.sleep(2.0)  # registrations are in before uploads (the runtime refuses uploads from unknown devices)
    for beat in range(heartbeats):
        for index, device, client in agents:
            client.publish(topics.heartbeat(device), P.control_frame(P.HEARTBEAT, run=run, device=device, round_=-1,
                                                                   beat=beat), qos=1)
    messages += count * (1 + heartbeats)
    for index, device, client in agents:
        frames = _device_frames(run, device, index)
        topic = topics.up(device, P.ingest_shard(run, device, shards)) if shards else topics.up(device)
        sent[device] = time.time()
        for frame in frames:
            client.publish(topic, frame, qos=1)
        messages += len(frames)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with lock:
            if len(acks) == len(agents):
                break
        time.sleep(0.1)
    for _, _, client in agents:
        client.disconnect()
        client.loop_stop()
    with lock:
        latencies = [acks[d] - sent[d] for d in acks if d in sent]
    results.put({"held": held, "agents": count, "acked": len(acks), "latencies": latencies, "messages": messages})


def _watch_console(url: str, stop, results, every_s: float = 1.0) -> None:
    """What an operator's open console page does (``console.js``: ``/api/status`` and a page of
    ``/api/devices`` every 2 s), twice as often, plus the page itself and a Prometheus scrape every 5 s;
    records each answer's latency. Runs in its own process, as a browser would."""
    import urllib.request

    latencies: dict[str, list[float]] = {"page": [], "status": [], "devices": [], "metrics": []}
    errors, tick = 0, 0
    paths = {"status": "api/status", "devices": "api/devices?sort=bytes_up&order=desc&limit=50", "page": "",
             "metrics": "metrics"}
    while not stop.is_set():
        for name in ("status", "devices") + (("page", "metrics") if tick % 5 == 0 else ()):
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(url + paths[name], timeout=30) as r:
                    r.read()
                latencies[name].append(time.perf_counter() - start)
            except OSError:
                errors += 1
        tick += 1
        stop.wait(every_s)
    results.put({"latencies": latencies, "errors": errors})


def run_load(agents: int, workers: int, heartbeats: int = 3, broker_url: str | None = None,
             state_dir: str | Path = "/tmp/edgefl-load", timeout_s: float = 300.0, console: bool = False,
             ingest_workers: int = 0) -> dict:
    """``console``: serve the runtime's console (``cloud_runtime/console``) and keep it open in another process
    for the whole load, like an operator's browser tab; the result then has ``console`` (answer latencies).
    ``ingest_workers``: the runtime's ``ingest.workers``, run as real worker processes (:class:`WorkerPool`)."""
    from cloud_runtime.config import load_runtime_config
    from cloud_runtime.console import start_console
    from cloud_runtime.ingest_worker import WorkerPool
    from cloud_runtime.service import build_runtime
    from edgefl_cli.mosquitto import EmbeddedMosquitto

    broker = None if broker_url else EmbeddedMosquitto().start()
    url = broker_url or broker.url  # type: ignore[union-attr]
    run = "load"
    pool = None
    try:
        overrides = [f"run_id={run}", f"broker.url={url}", f"state_dir={state_dir}", f"expected_devices={agents}",
                     "validation.quarantine_after=1000000", "console.address=127.0.0.1:0",
                     f"console.enabled={str(console).lower()}", f"ingest.workers={ingest_workers}",
                     "ingest.spawn=false"]
        cfg = load_runtime_config(None, overrides)
        runtime = build_runtime(cfg)
        server = start_console(runtime) if console else None
        runtime.start()
        stop = threading.Event()
        pump = threading.Thread(target=lambda: [runtime.pump(0.05) for _ in iter(stop.is_set, True)], daemon=True)
        pump.start()
        if ingest_workers:
            config = Path(state_dir) / "loadgen-runtime.yaml"
            config.parent.mkdir(parents=True, exist_ok=True)
            config.write_text("{}\n")  # everything is in the overrides
            pool = WorkerPool(str(config), overrides, ingest_workers, log_level="WARNING")
            deadline = time.monotonic() + 60
            while sum(s.get("state") == "online" for s in runtime.shards.worker_status.values()) < ingest_workers:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"ingest workers not online within 60 s: {runtime.shards.worker_status}")
                time.sleep(0.1)
        # The first registration builds the server model (seconds); do it before the clock starts.
        runtime.enqueue(runtime.topics.up("warmup"), P.control_frame(
            P.REGISTER, run=run, device="warmup", round_=-1, num_classes=CLASSES, feature_channels=FEATURES[0],
            train_samples=SAMPLES, test_samples=0, model="resnet8_gkt"))
        while "warmup" not in runtime.registry.devices:
            time.sleep(0.05)
        ctx = mp.get_context("spawn")
        ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
        watching, watch_results = ctx.Event(), ctx.Queue()
        watcher = ctx.Process(target=_watch_console, args=(server.url, watching, watch_results)) if server else None
        if watcher is not None:
            watcher.start()
        per = [agents // workers + (1 if w < agents % workers else 0) for w in range(workers)]
        procs, first = [], 0
        for n in per:
            procs.append(ctx.Process(target=_worker, args=(url, run, first, n, heartbeats, ready, go, results,
                                                            ingest_workers)))
            first += n
        t0 = time.perf_counter()
        for p in procs:
            p.start()
        held = sum(ready.get(timeout=timeout_s) for _ in procs)
        connect_s = time.perf_counter() - t0
        logger.info("%d/%d agents connected at once in %.1fs", held, agents, connect_s)
        messages_before, start = runtime.messages_in, time.perf_counter()
        go.set()
        reports = [results.get(timeout=timeout_s) for _ in procs]
        elapsed = time.perf_counter() - start
        for p in procs:
            p.join(30)
        watched = None
        if watcher is not None:
            watching.set()
            watched = watch_results.get(timeout=60)
            watcher.join(30)
        stop.set()
        pump.join(10)
        latencies = sorted(x for r in reports for x in r["latencies"])
        heartbeats_seen = sum(1 for d, info in runtime.registry.devices.items() if d != "warmup" and info.get("heartbeat"))
        accepted = len(runtime.strategy.train_uploads)
        result = {
            "agents": agents, "workers": workers, "held_connected": held, "connect_seconds": connect_s,
            "registered": len(runtime.registry.devices) - 1, "uploads_accepted": accepted,
            "uploads_acked": sum(r["acked"] for r in reports), "lost_uploads": agents - accepted,
            "devices_with_heartbeat": heartbeats_seen, "lost_heartbeat_devices": agents - heartbeats_seen,
            "messages_handled": runtime.messages_in - messages_before, "seconds": elapsed,
            "messages_per_s": (runtime.messages_in - messages_before) / elapsed,
            "ingest_workers": ingest_workers, "forwarded_transfers": (runtime.shards.forwarded if runtime.shards else 0),
            "fleet_messages": sum(r["messages"] for r in reports),
            "fleet_messages_per_s": sum(r["messages"] for r in reports) / elapsed,
            "rejections": dict(runtime.registry.rejections),
            "ack_latency_s": {"p50": _pct(latencies, 50), "p90": _pct(latencies, 90), "p99": _pct(latencies, 99),
                              "max": latencies[-1] if latencies else None,
                              "mean": statistics.mean(latencies) if latencies else None},
        }
        if watched is not None:
            result["console"] = {"errors": watched["errors"], **{
                name: {"answers": len(v), "p50_s": _pct(sorted(v), 50), "p99_s": _pct(sorted(v), 99),
                       "max_s": max(v) if v else None} for name, v in watched["latencies"].items()}}
            server.stop()
        runtime.close()
        return result
    finally:
        if pool is not None:
            pool.close()
        if broker is not None:
            broker.stop()


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.percentile(values, q))


def main() -> None:
    from edgefl_cli.logs import setup_logging
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8, help="processes the agents are spread over")
    parser.add_argument("--heartbeats", type=int, default=3)
    parser.add_argument("--broker", default=None, help="use this broker instead of a private mosquitto")
    parser.add_argument("--out", default=None, help="write load.json here")
    parser.add_argument("--ingest-workers", type=int, nargs="+", default=[0],
                        help="the runtime's ingest workers; several counts run in turn, --trials times alternately")
    parser.add_argument("--trials", type=int, default=1)
    args = parser.parse_args()
    setup_logging("WARNING")
    logger.setLevel(logging.INFO)
    if args.ingest_workers == [0] and args.trials == 1:
        result = run_load(args.agents, args.workers, args.heartbeats, args.broker)
        print(json.dumps(result, indent=2))
        if args.out:
            Path(args.out).mkdir(parents=True, exist_ok=True)
            (Path(args.out) / "load.json").write_text(json.dumps(result, indent=2))
        return
    runs: dict[int, list[dict]] = {n: [] for n in args.ingest_workers}
    for trial in range(args.trials):
        for n in args.ingest_workers:
            r = run_load(args.agents, args.workers, args.heartbeats, args.broker, ingest_workers=n,
                         state_dir=f"/tmp/edgefl-load-{n}-{trial}")
            runs[n].append(r)
            logger.info("trial %d, %d ingest workers: %.0f fleet messages/s, ACK p50 %.2f s p99 %.2f s, %d/%d "
                        "accepted", trial, n, r["fleet_messages_per_s"], r["ack_latency_s"]["p50"] or -1,
                        r["ack_latency_s"]["p99"] or -1, r["uploads_accepted"], args.agents)
    summary = compare_ingest_workers(runs)
    print("\n".join(summary["table"]))
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "load_ingest.json").write_text(json.dumps({"args": vars(args), "summary": summary,
                                                                       "runs": runs}, indent=2))


def compare_ingest_workers(runs: dict[int, list[dict]]) -> dict:
    """Medians over trials per ingest-worker count, and ratios to the first count's (the baseline)."""
    med = {n: {"fleet_messages_per_s": statistics.median(r["fleet_messages_per_s"] for r in rs),
               "ack_p50_s": statistics.median(r["ack_latency_s"]["p50"] for r in rs),
               "ack_p99_s": statistics.median(r["ack_latency_s"]["p99"] for r in rs),
               "lost_uploads": max(r["lost_uploads"] for r in rs)} for n, rs in runs.items()}
    base = med[next(iter(med))]
    table = ["| ingest workers | fleet messages/s | ratio | ACK p50 s | ACK p99 s | p99 ratio | lost uploads |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for n, m in med.items():
        m["ratio"] = m["fleet_messages_per_s"] / base["fleet_messages_per_s"]
        m["p99_ratio"] = m["ack_p99_s"] / base["ack_p99_s"]
        table.append(f"| {n} | {m['fleet_messages_per_s']:.0f} | {m['ratio']:.2f}x | {m['ack_p50_s']:.2f} | "
                     f"{m['ack_p99_s']:.2f} | {m['p99_ratio']:.2f}x | {m['lost_uploads']} |")
    return {"medians": {str(n): m for n, m in med.items()}, "table": table}


if __name__ == "__main__":
    main()
