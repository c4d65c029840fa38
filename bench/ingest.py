"""Runtime ingest through mosquitto on loopback: MB/s and messages/s of feature uploads.

K publisher processes (protocol-only devices) register and then upload one round of features each
(N samples, chunked) at the same moment; the cloud runtime (in this process, real paho transport)
reassembles, checksums, decompresses, decodes and validates them. Reported: wire MB/s, chunk
messages/s and decoded fp32 MB/s from the first publish to the last accepted transfer.

    python bench/ingest.py --devices 4 --samples 4000 --codec int8 --out docs/bench/ingest
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_runtime.config import load_runtime_config  # noqa: E402
from cloud_runtime.service import build_runtime  # noqa: E402
from edge_sdk import protocol as P  # noqa: E402
from edge_sdk.messages import FeatureUpload  # noqa: E402
from edgefl_core.transport.mqtt import MqttTransport  # noqa: E402
from edgefl_cli.mosquitto import EmbeddedMosquitto  # noqa: E402

RUN = "ingest"


def publisher(url: str, device: str, samples: int, codec: str, chunk: int, start_at: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(samples, 16, 14, 14, generator=g))  # post-ReLU, like the stem's output
    upload = FeatureUpload(device, 0, "train", np.arange(seed * samples, (seed + 1) * samples, dtype=np.int64),
                           features, torch.randn(samples, 10, generator=g), torch.randint(0, 10, (samples,), generator=g))
    arrays, meta = P.upload_to_arrays(upload, codec)
    frames = P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device=device, round_=0, meta=meta, max_chunk=chunk)
    transport = MqttTransport(url, f"bench-{device}")
    transport.connect()
    transport.publish(P.Topics(RUN).up(device), P.control_frame(
        P.REGISTER, run=RUN, device=device, round_=-1, num_classes=10, feature_channels=16, train_samples=samples))
    transport.flush(30)
    time.sleep(max(0.0, start_at - time.time()))
    topic = P.Topics(RUN).up(device)
    for frame in frames:
        transport.publish(topic, frame)
    transport.flush(300)
    transport.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=4)
    parser.add_argument("--samples", type=int, default=4000)
    parser.add_argument("--codec", default="int8", choices=P.CODECS)
    parser.add_argument("--chunk-bytes", type=int, default=P.DEFAULT_CHUNK_BYTES)
    parser.add_argument("--out", default="docs/bench/ingest")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with EmbeddedMosquitto() as broker:
        cfg = load_runtime_config(None, [f"run_id={RUN}", f"broker.url={broker.url}", f"state_dir={out / 'state'}",
                                         f"expected_devices={args.devices}"])
        runtime = build_runtime(cfg)
        runtime.start()
        start_at = time.time() + 8.0  # time for the publishers to start, build frames, connect and register
        ctx = mp.get_context("spawn")
        procs = [ctx.Process(target=publisher, args=(broker.url, f"pub{i}", args.samples, args.codec, args.chunk_bytes,
                                                    start_at, i)) for i in range(args.devices)]
        for p in procs:
            p.start()
        deadline = time.time() + 600
        while len(runtime.strategy.train_uploads) < args.devices and time.time() < deadline:
            runtime.pump(0.05)
        elapsed = time.time() - start_at
        for p in procs:
            p.join(30)
        runtime.close()
    if len(runtime.strategy.train_uploads) < args.devices:
        print(f"only {len(runtime.strategy.train_uploads)} of {args.devices} uploads arrived", file=sys.stderr)
        return 1
    wire = sum(d["bytes_up"] for d in runtime.registry.devices.values())
    raw = sum(d["raw_fp32_bytes"] for d in runtime.registry.devices.values())
    chunks = runtime.messages_in - args.devices  # less the registrations
    result = {"args": vars(args), "seconds": elapsed, "wire_MB": wire / 1e6, "wire_MBps": wire / 1e6 / elapsed,
              "messages_per_s": chunks / elapsed, "decoded_fp32_MBps": raw / 1e6 / elapsed,
              "samples_per_s": args.devices * args.samples / elapsed, "rejections": dict(runtime.registry.rejections)}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
