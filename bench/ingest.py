"""Runtime ingest through mosquitto on loopback, against a raw paho subscriber on the same broker.

K publisher processes (protocol-only devices) register and then upload one round of features each
(N samples, chunked) at the same moment. Each trial is received either by a raw paho subscriber
(MQTT 5, QoS 1, counting bytes: the broker's relay rate, the ceiling) or by the cloud runtime (in this
process, real paho transport), which reassembles, checksums, decompresses, checks and holds them. The
two alternate, trial by trial, so load from elsewhere hits both alike. Reported per receiver: wire MB/s,
chunk messages/s from the first publish to the last byte (raw) or the last accepted transfer (runtime);
the median of the trials and the runtime/raw ratio. With ``--workers 0 1 2 4`` the runtime is also measured
with that many ingest workers (processes, ``cloud_runtime/ingest_worker.py``: the publishers send to their
shards; 0 is the runtime alone), each count in every trial, and the ratios between them are printed.

    python -m bench.ingest --devices 4 --samples 4000 --codec int8 --trials 5 --out docs/bench/ingest
    python -m bench.ingest --devices 4 --samples 4000 --codec int8 --trials 3 --workers 0 1 2 4 \
        --out docs/bench/ingest_workers
"""
from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing as mp
import statistics
import sys
import threading
import time
import zlib
from pathlib import Path

import paho.mqtt.client as mqtt

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_runtime.config import load_runtime_config  # noqa: E402
from cloud_runtime.ingest_worker import WorkerPool  # noqa: E402
from cloud_runtime.service import build_runtime  # noqa: E402
from edge_sdk import protocol as P  # noqa: E402
from edge_sdk.messages import FeatureUpload  # noqa: E402
from edgefl_core.codecs import decompress  # noqa: E402
from edgefl_core.transport.mqtt import MqttTransport  # noqa: E402
from edgefl_cli.mosquitto import EmbeddedMosquitto  # noqa: E402

def publisher(url: str, run: str, device: str, samples: int, codec: str, chunk: int, start_at: float, seed: int,
              counts, release, shards: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(samples, 16, 14, 14, generator=g))  # post-ReLU, like the stem's output
    upload = FeatureUpload(device, 0, "train", np.arange(seed * samples, (seed + 1) * samples, dtype=np.int64),
                           features, torch.randn(samples, 10, generator=g), torch.randint(0, 10, (samples,), generator=g))
    arrays, meta = P.upload_to_arrays(upload, codec)
    frames = P.chunk_transfer(P.pack_arrays(arrays), run=run, device=device, round_=0, meta=meta, max_chunk=chunk)
    counts.put((len(frames), sum(len(f) for f in frames)))
    transport = MqttTransport(url, f"bench-{device}")
    transport.connect()
    transport.publish(P.Topics(run).up(device), P.control_frame(
        P.REGISTER, run=run, device=device, round_=-1, num_classes=10, feature_channels=16, train_samples=samples))
    transport.flush(30)
    time.sleep(max(0.0, start_at - time.time()))
    topic = P.Topics(run).up(device, P.ingest_shard(run, device, shards) if shards else None)
    for frame in frames:
        transport.publish(topic, frame)
    transport.flush(300)
    release.wait(600)  # idle until the receiver is done: no process teardown inside the measured window
    transport.close()


class Publishers:
    """The publisher processes of one trial: they publish at ``start_at`` and exit once released."""

    def __init__(self, url: str, run: str, args, start_at: float, shards: int = 0):
        ctx = mp.get_context("spawn")
        counts, self.release = ctx.Queue(), ctx.Event()
        self.procs = [ctx.Process(target=publisher, args=(url, run, f"pub{i}", args.samples, args.codec,
                                                          args.chunk_bytes, start_at, i, counts, self.release,
                                                          shards))
                      for i in range(args.devices)]
        for p in self.procs:
            p.start()
        sent = [counts.get(timeout=120) for _ in self.procs]
        self.messages, self.wire = sum(n for n, _ in sent), sum(b for _, b in sent)

    def finish(self) -> None:
        self.release.set()
        for p in self.procs:
            p.join(60)


def raw_trial(url: str, run: str, args, floor: bool = False) -> dict:
    """A bare paho subscriber (MQTT 5, QoS 1) counting the uploads' bytes: what the broker relays. ``floor``:
    it also does the least any ingest must do, on its network thread: parse each frame, crc32 its body, and
    per completed transfer join the chunks, check the sha256 and zstd-decompress (no shape or value checks, no
    store): the runtime cannot be faster than this on the same cores."""
    got = {"messages": 0, "bytes": 0, "last": 0.0}
    done = threading.Event()
    expected = {"messages": None}
    topics = P.Topics(run)
    transfers: dict[str, list] = {}

    def verify(payload: bytes) -> None:
        header, body = P.decode_frame(payload)
        assert zlib.crc32(body) == header["crc32"]
        parts = transfers.setdefault(header["transfer"], [None] * header["count"])
        parts[header["index"]] = body
        if all(p is not None for p in parts):
            blob = b"".join(transfers.pop(header["transfer"]))
            assert hashlib.sha256(blob).hexdigest() == header["sha256"]
            decompress(blob, 1 << 30)

    def on_message(client, userdata, message):
        if message.topic.endswith("/up") and len(message.payload) > 1024:  # chunks, not registrations
            if floor:
                verify(message.payload)
            got["messages"] += 1
            got["bytes"] += len(message.payload)
            got["last"] = time.time()
            if expected["messages"] is not None and got["messages"] >= expected["messages"]:
                done.set()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"raw-{run}", protocol=mqtt.MQTTv5)
    client.on_message = on_message
    client.on_connect = lambda c, u, f, rc, p: c.subscribe(topics.all_up, qos=1)
    address = MqttTransport(url, "address-only").address
    client.connect(address.host, address.port)
    client.loop_start()
    start_at = time.time() + 8.0  # time for the publishers to start, build frames, connect and register
    publishers = Publishers(url, run, args, start_at)
    messages = expected["messages"] = publishers.messages
    if got["messages"] >= messages:
        done.set()
    done.wait(600)
    publishers.finish()
    client.loop_stop()
    client.disconnect()
    elapsed = got["last"] - start_at
    return {"receiver": "raw paho + checks floor" if floor else "raw paho", "seconds": elapsed, "wire_MB": got["bytes"] / 1e6,
            "wire_MBps": got["bytes"] / 1e6 / elapsed, "messages_per_s": got["messages"] / elapsed,
            "complete": got["messages"] >= messages}


def runtime_trial(url: str, run: str, args, state_dir: Path, workers: int = 0) -> dict:
    """The cloud runtime receiving the same uploads (reassembly, sha256, zstd, checks, the feature store), alone
    or with ``workers`` ingest worker processes doing the reassembly, checksums and decompression."""
    overrides = [f"run_id={run}", f"broker.url={url}", f"state_dir={state_dir}", f"expected_devices={args.devices}",
                 "num_classes=10", f"ingest.workers={workers}", "console.enabled=false"]
    cfg = load_runtime_config(None, overrides)
    runtime = build_runtime(cfg)
    runtime.start()
    pool = None
    if workers:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / "runtime.yaml").write_text("{}\n")
        pool = WorkerPool(str(state_dir / "runtime.yaml"), overrides, workers, log_level="WARNING")
        ready = time.time() + 120   # the workers import, connect and subscribe (outside the measured window): a
        while time.time() < ready and sum(s["state"] == "online" for s in runtime.shards.worker_status.values()) < workers:
            runtime.pump(0.1)      # chunk published before its worker subscribed is lost (no resends here)
    start_at = time.time() + 8.0
    publishers = Publishers(url, run, args, start_at, shards=workers)
    messages = publishers.messages
    deadline, cpu_start = time.time() + 600, None
    while len(runtime.strategy.train_uploads) < args.devices and time.time() < deadline:
        if cpu_start is None and time.time() >= start_at:
            cpu_start = time.process_time()  # this process is the coordinator (publishers, workers: others)
        runtime.pump(0.05)
    elapsed = time.time() - start_at
    cpu = time.process_time() - (cpu_start if cpu_start is not None else time.process_time())
    publishers.finish()
    runtime.close()
    if pool is not None:
        pool.close()
    wire = sum(d["bytes_up"] for d in runtime.registry.devices.values())
    raw = sum(d["raw_fp32_bytes"] for d in runtime.registry.devices.values())
    return {"receiver": f"runtime+{workers} workers" if workers else "runtime", "seconds": elapsed, "wire_MB": wire / 1e6, "wire_MBps": wire / 1e6 / elapsed,
            "messages_per_s": messages / elapsed, "decoded_fp32_MBps": raw / 1e6 / elapsed,
            "coordinator_cpu_s": cpu, "coordinator_MB_per_cpu_s": wire / 1e6 / cpu if cpu > 0 else None,
            "held_MB": runtime.strategy.server.train_store.nbytes() / 1e6 if runtime.strategy.server else None,
            "complete": len(runtime.strategy.train_uploads) == args.devices,
            "rejections": dict(runtime.registry.rejections)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--codec", default="int8", choices=P.CODECS)
    parser.add_argument("--chunk-bytes", type=int, default=P.DEFAULT_CHUNK_BYTES)
    parser.add_argument("--trials", type=int, default=5)
    parser.add_argument("--workers", type=int, nargs="+", default=[0],
                        help="ingest worker counts to measure the runtime with (0: the runtime alone)")
    parser.add_argument("--floor", action="store_true",
                        help="also measure the raw subscriber doing the least any ingest must do (crc32, sha256, "
                             "zstd): the runtime's ceiling on these cores")
    parser.add_argument("--out", default="docs/bench/ingest")
    parser.add_argument("--summarize", action="store_true",
                        help="recompute the summary of --out's results.json from its trials (no new trials)")
    args = parser.parse_args()
    out = Path(args.out)
    if args.summarize:
        saved = json.loads((out / "results.json").read_text())
        return summarize(saved["trials"], saved["args"], out)
    out.mkdir(parents=True, exist_ok=True)
    trials: list[dict] = []
    with EmbeddedMosquitto() as broker:
        for trial in range(args.trials):
            for kind in ("raw", *(["floor"] if args.floor else []), *args.workers):  # alternating
                run = f"ingest-{kind}-{trial}"
                result = (raw_trial(broker.url, run, args, floor=kind == "floor") if kind in ("raw", "floor")
                          else runtime_trial(broker.url, run, args, out / "state" / run, kind))
                trials.append(result)
                print(f"trial {trial + 1}/{args.trials} {result['receiver']:20s}: {result['wire_MBps']:6.1f} MB/s, "
                      f"{result['messages_per_s']:5.0f} msgs/s{'' if result['complete'] else ' (INCOMPLETE)'}",
                      flush=True)
    return summarize(trials, vars(args), out)


def summarize(trials: list[dict], args: dict, out: Path) -> int:
    """Medians and ratios of ``trials`` into ``out/results.json``, printed; 1 when a trial was incomplete."""
    if not all(t["complete"] for t in trials):
        print("a trial did not receive every upload", file=sys.stderr)
        return 1
    kinds = list(dict.fromkeys(t["receiver"] for t in trials))
    median = {kind: statistics.median(t["wire_MBps"] for t in trials if t["receiver"] == kind) for kind in kinds}
    runtimes = [k for k in kinds if k.startswith("runtime")]
    first = runtimes[0]  # the first runtime measured (the runtime alone, with the default --workers 0)
    # what the coordinator's own process spends per MB: the ceiling of one coordinator once workers have cores
    # (a trial whose uploads were all in before the timed loop began has no reading)
    per_cpu = {k: statistics.median(v) if (v := [t["coordinator_MB_per_cpu_s"] for t in trials if t["receiver"] == k
                                                 and t.get("coordinator_MB_per_cpu_s")]) else None
               for k in runtimes}
    result = {"args": args, "median_wire_MBps": median,
              "runtime_over_raw": median[first] / median["raw paho"],
              "over_raw": {k: median[k] / median["raw paho"] for k in kinds[1:]},
              f"over_{first.replace(' ', '_')}": {k: median[k] / median[first] for k in kinds[1:]},
              "coordinator_MB_per_cpu_s": per_cpu, "trials": trials}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    for kind in kinds[1:]:
        cpu = (f"; the coordinator {per_cpu[kind]:.0f} MB per CPU-second ({per_cpu[kind] / per_cpu[first]:.2f}x "
               f"{first})" if per_cpu.get(kind) and per_cpu[first] else "")
        print(f"median: {kind:24s} {median[kind]:6.1f} MB/s: {median[kind] / median['raw paho']:4.0%} of raw paho "
              f"({median['raw paho']:.1f} MB/s), {median[kind] / median[first]:.2f}x {first}{cpu}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
