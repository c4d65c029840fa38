"""A server-training job for ``tests/test_distributed.py``: the real ResNet-55 server trained on synthetic int8
uploads for two rounds, in one process or as the ranks torchrun starts (rank 0 the coordinator, the others
:func:`cloud_runtime.distributed.serve_rank`). Rank 0 writes the soft labels, the stats and the model to
``out`` (an .npz).

    python tests/jobs/dist_server.py OUT.npz [--soft-labels last_epoch|eval_pass]
    torchrun --standalone --nproc-per-node 2 tests/jobs/dist_server.py OUT.npz
"""
import argparse
import logging
import sys
import threading
from types import SimpleNamespace

import numpy as np
import torch

from cloud_runtime.config import ServerConfig
from cloud_runtime.distributed import TrainingGroup, launched, serve_rank
from cloud_runtime.progress import Interrupted
from cloud_runtime.features import HeldUpload, features_from_arrays
from cloud_runtime.server_trainer import GKTServer
from model_zoo import create_model


def uploads(classes: int, channels: int, round_: int) -> list[HeldUpload]:
    """Two devices' int8 train uploads (quantized as the codec does) with learnable labels."""
    from edgefl_core.codecs import feature_codec
    out = []
    for d, n in (("dev-a", 203), ("dev-b", 150)):  # 353 rows: a last global batch of 33 splits 17 / 16
        g = np.random.default_rng(round_ * 10 + len(out))
        labels = g.integers(0, classes, n)
        x = g.normal(0, 1, (n, channels, 7, 7)).astype(np.float32)
        x[np.arange(n), labels % channels] += 2.0
        features = features_from_arrays(feature_codec("int8").encode(x), "int8")
        out.append(HeldUpload(d, round_, "train", np.arange(n, dtype=np.int64) + 1000 * len(out), features,
                              g.normal(0, 1, (n, classes)).astype(np.float32), labels.astype(np.int64), {}))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--soft-labels", default="last_epoch")
    parser.add_argument("--kd-beta", type=float, default=0.5)
    parser.add_argument("--fail-at-round", type=int, default=None,
                        help="the coordinator fails (an error of its own) while planning this round's shards")
    parser.add_argument("--stop-after", type=int, default=None,
                        help="the coordinator is asked to stop after this many of round 1's global batches")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(1)
    classes, channels = 5, 8
    cfg = ServerConfig(model="resnet55_server", optimizer="adam", lr=1e-3, weight_decay=0.0, batch_size=32,
                       epochs=2, kd_beta=args.kd_beta, soft_labels=args.soft_labels, device="cpu")
    spec = {"name": cfg.model, "num_classes": classes, "feature_channels": channels, "kwargs": {}}
    launch = launched()
    if launch is not None and not launch.coordinator:
        return serve_rank(launch, SimpleNamespace(server=cfg))
    group = TrainingGroup(launch, timeout_s=600) if launch is not None else None
    if args.fail_at_round is not None:
        import cloud_runtime.server_trainer as trainer   # the name the round looks up
        plan, calls = trainer.plan_shards, []

        def failing_plan(*a, **kw):
            calls.append(1)
            if len(calls) > 2 * args.fail_at_round:  # 2 epochs a round
                raise MemoryError("planning the shards (injected)")
            return plan(*a, **kw)
        trainer.plan_shards = failing_plan
    torch.manual_seed(0)
    model = create_model(cfg.model, num_classes=classes, feature_channels=channels)
    server = GKTServer(model, cfg, classes, seed=0, group=group, model_spec=spec)
    saved = {}
    stop, steps = threading.Event(), [0]

    def progress(_):
        steps[0] += 1
        if args.stop_after is not None and steps[0] >= args.stop_after:
            stop.set()
    try:
        for round_ in range(2):
            for u in uploads(classes, channels, round_):
                server.ingest(u)
            try:
                replies, stats = server.train_round(round_, progress=progress if round_ == 1 else None, stop=stop)
            except Interrupted:
                np.savez(args.out, interrupted=np.array([round_, steps[0]]))
                return 0
            for device, reply in replies.items():
                saved[f"r{round_}/{device}/ids"] = reply.sample_ids
                saved[f"r{round_}/{device}/logits"] = reply.logits.numpy()
            saved[f"r{round_}/stats"] = np.array([stats.loss, stats.ce, stats.kd, stats.train_accuracy, stats.samples])
        for k, v in server.model.state_dict().items():
            saved[f"model/{k}"] = v.numpy()
        np.savez(args.out, **saved)
    finally:
        if group is not None:
            group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
