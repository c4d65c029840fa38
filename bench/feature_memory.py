"""Bytes the server holds per training sample: the compact feature store against the path before it, side
by side (each in a fresh process, resident memory measured from /proc before and after).

Each variant receives D devices' int8 uploads (synthetic post-ReLU 16x14x14 features, packed and unpacked
as on the wire), holds them as a round of server training would, and draws one epoch of batches.

- ``before``: the path this store replaced: the upload decoded to fp32 and kept referenced, an fp16
  copy in the server's store, and the ``torch.cat`` of every device's fp16 features made each round.
- ``compact``: ``cloud_runtime/features.py``: the uint8 values with their per-channel scale and offset,
  held once, batches dequantized as drawn.

Reported: process RSS growth per held sample against the compact payload (uint8 features + fp16 logits
+ int64 id and label), and for ``compact`` at scale (default 500,000 samples) the process RSS.

    python -m bench.feature_memory --samples 20000 --scale 500000 --out docs/bench/feature_memory
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import time
from pathlib import Path

import numpy as np

SHAPE, CLASSES = (16, 14, 14), 10


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def wire_upload(device: int, n: int, rng: np.random.Generator) -> tuple[bytes, dict]:
    from edgefl_core.codecs import UploadArrays, encode_upload, pack_arrays
    features = np.maximum(rng.standard_normal((n, *SHAPE), dtype=np.float32), 0)
    up = UploadArrays("train", np.arange(device * n, (device + 1) * n, dtype=np.int64), features,
                      rng.standard_normal((n, CLASSES), dtype=np.float32), rng.integers(0, CLASSES, n), {})
    arrays, meta = encode_upload(up, "int8")
    return pack_arrays(arrays), meta


def hold(variant: str, samples: int, per_device: int, batch: int, result) -> None:
    """In a fresh process: receive, hold and draw one epoch; put the figures on ``result``."""
    import torch
    from cloud_runtime.features import FeatureStore, HeldUpload
    from edgefl_core.codecs import decode_upload, unpack_arrays
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    devices = max(1, samples // per_device)
    blobs = [wire_upload(d, per_device, rng) for d in range(devices)]  # what arrives: not counted as held
    base = rss_bytes()
    start = time.perf_counter()
    if variant == "before":
        uploads, stored = [], []
        for blob, meta in blobs:
            up = decode_upload(unpack_arrays(blob, 1 << 40), meta)
            uploads.append(torch.from_numpy(up.features))                  # the fp32 upload, kept referenced
            stored.append(uploads[-1].to(torch.float16))                    # the server's fp16 store
        features = torch.cat(stored)                                        # the round's concatenation
        n = len(features)
        for i in range(0, n, batch):
            features[i:i + batch].float()
    else:
        store = FeatureStore()
        for d, (blob, meta) in enumerate(blobs):
            store.put(HeldUpload.from_arrays(unpack_arrays(blob, 1 << 40), meta, f"dev{d}", 0))
        names, offsets = store.layout()
        n = int(offsets[-1])
        order = np.random.default_rng(1).permutation(n)
        for i in range(0, n, batch):
            store.batch(order[i:i + batch], names, offsets)
    seconds = time.perf_counter() - start
    held = rss_bytes() - base  # the received blobs are resident in both readings
    compact = int(np.prod(SHAPE)) + 2 * CLASSES + 16 + 2 * 4 * SHAPE[0] / per_device
    result.put({"variant": variant, "samples": n, "held_bytes_per_sample": held / n, "compact_bytes_per_sample":
                compact, "over_compact": held / n / compact, "process_rss_GB": rss_bytes() / 1e9, "seconds": seconds})


def measure(variant: str, samples: int, per_device: int, batch: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=hold, args=(variant, samples, per_device, batch, queue))
    proc.start()
    result = queue.get(timeout=3600)
    proc.join(60)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=20_000, help="held samples for the side-by-side ratio")
    parser.add_argument("--scale", type=int, default=500_000, help="held samples for the compact store at scale")
    parser.add_argument("--per-device", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--out", default="docs/bench/feature_memory")
    args = parser.parse_args()
    rows = [measure("before", args.samples, args.per_device, args.batch),
            measure("compact", args.samples, args.per_device, args.batch)]
    if args.scale:
        rows.append(measure("compact", args.scale, args.per_device, args.batch))
    print(f"{'variant':8s} {'samples':>8s} {'held B/sample':>14s} {'compact B/sample':>17s} {'x compact':>10s} "
          f"{'process RSS':>12s}")
    for r in rows:
        print(f"{r['variant']:8s} {r['samples']:8d} {r['held_bytes_per_sample']:14.0f} "
              f"{r['compact_bytes_per_sample']:17.0f} {r['over_compact']:10.2f} {r['process_rss_GB']:10.2f} GB")
    print(f"compact store vs before at {args.samples:,} samples: {rows[1]['held_bytes_per_sample'] / rows[0]['held_bytes_per_sample']:.3f}x "
          "the bytes per held sample")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "results": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
