"""Feature codecs: upload bytes per sample vs the accuracy they cost (fp32 / fp16 / int8, each + zstd).

Part 1 measures bytes per sample and reconstruction error on real ResNet-8 features of Fashion-MNIST
(stride 1 = FedML's 16x28x28 features, stride 2 = the quickstart's 16x14x14). Part 2 runs the same
in-process FedGKT configuration once per codec, each upload going through that codec's
encode/decode, and reports final test accuracy side by side.

    python bench/codecs.py --train-subset 8000 --rounds 3 --out docs/bench/codecs
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cloud_runtime.config import load_config  # noqa: E402
from edge_sdk import protocol as P  # noqa: E402
from edge_sdk.client import EdgeClient  # noqa: E402
from edge_sdk.config import EdgeConfig  # noqa: E402
from edgefl_core.data.datasets import load_dataset  # noqa: E402
from edgefl_core.data.federated import stratified_subset  # noqa: E402
from model_zoo import create_model  # noqa: E402
from edgefl_cli.logs import setup_logging  # noqa: E402
from edgefl_cli.simulation import run_in_memory  # noqa: E402


def bytes_table(samples: int, seed: int) -> list[dict]:
    train = stratified_subset(load_dataset("fashion_mnist", "train"), 4000, seed)
    rows = []
    for stride in (1, 2):
        torch.manual_seed(seed)
        model = create_model("resnet8_gkt", in_channels=1, stem_stride=stride)
        client = EdgeClient("d", model, train, train.subset(np.arange(samples)), EdgeConfig(optimizer="adam", lr=1e-3),
                            stats_name="fashion_mnist")
        client.train_round(0)  # features of a trained extractor, not of random weights
        upload = client.extract("test", 0)
        for codec in P.CODECS:
            arrays, meta = P.upload_to_arrays(upload, codec)
            start = time.perf_counter()
            blob = P.pack_arrays(arrays)
            encode_s = time.perf_counter() - start
            start = time.perf_counter()
            decoded = P.arrays_to_upload(P.unpack_arrays(blob), meta, "d", 0)
            decode_s = time.perf_counter() - start
            err = (decoded.features - upload.features).float()
            rows.append({"stem_stride": stride, "feature_shape": list(upload.features.shape[1:]), "codec": codec,
                         "bytes_per_sample": len(blob) / samples, "raw_fp32_bytes_per_sample": meta["raw_fp32_bytes"] / samples,
                         "ratio_vs_fp32": meta["raw_fp32_bytes"] / len(blob),
                         "relative_rmse": float(err.pow(2).mean().sqrt() / upload.features.float().pow(2).mean().sqrt()),
                         "encode_MBps": meta["raw_fp32_bytes"] / encode_s / 1e6,
                         "decode_MBps": meta["raw_fp32_bytes"] / decode_s / 1e6})
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-subset", type=int, default=8000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--samples", type=int, default=2000, help="samples for the bytes table")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="docs/bench/codecs")
    args = parser.parse_args()
    setup_logging("WARNING")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = bytes_table(args.samples, args.seed)
    accuracy = {}
    for codec in P.CODECS:
        cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml",
                          [f"data.train_subset={args.train_subset}", f"run.rounds={args.rounds}",
                           f"run.seed={args.seed}", f"run.name=codec-{codec}", f"deployment.codec={codec}"])
        report = run_in_memory(cfg, out / f"run-{codec}")
        accuracy[codec] = report["final"]["test_accuracy"]
        print(f"{codec}: final test accuracy {accuracy[codec]:.4f}", flush=True)
    (out / "results.json").write_text(json.dumps({"args": vars(args), "bytes": table, "accuracy": accuracy}, indent=2))
    lines = ["| stem stride | features | codec (+zstd) | bytes/sample | vs fp32 raw | relative RMSE | encode MB/s | decode MB/s |",
             "| ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in table:
        lines.append(f"| {r['stem_stride']} | {'x'.join(map(str, r['feature_shape']))} | {r['codec']} | "
                     f"{r['bytes_per_sample']:,.0f} | {r['ratio_vs_fp32']:.1f}x | {r['relative_rmse']:.4f} | "
                     f"{r['encode_MBps']:.0f} | {r['decode_MBps']:.0f} |")
    lines += ["", f"FedGKT accuracy, quickstart config with train_subset={args.train_subset}, rounds={args.rounds} "
              "(stride 2), uploads through each codec:", "", "| codec | final test accuracy | vs fp32 |",
              "| --- | ---: | ---: |"]
    for codec, acc in accuracy.items():
        lines.append(f"| {codec} | {acc:.4f} | {100 * (acc - accuracy['fp32']):+.2f} pts |")
    text = "\n".join(lines)
    (out / "results.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
