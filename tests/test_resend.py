"""The report counts uplink bytes by what became of them (issue 14, item 6): ``bytes_up`` is the wire bytes
of accepted transfers (each chunk's first copy, counted once, at acceptance); re-sent and rejected bytes are
reported beside it, never as upload."""

import numpy as np
import pytest
import torch

from cloud_runtime.config import load_runtime_config
from cloud_runtime.service import CloudRuntime
from edge_sdk import protocol as P
from edge_sdk.messages import FeatureUpload
from edgefl_core.transport import MemoryBus

RUN = "r"


# -- the runtime's byte accounting ----------------------------------------------------------------------------


def make_runtime(tmp_path):
    cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={tmp_path / 'rt'}", "server.batch_size=8",
                                     "transfer_timeout_s=60"])
    runtime = CloudRuntime(cfg, MemoryBus().client("runtime"))
    for device in ("devA", "devB"):
        runtime.register(device, {"num_classes": 4, "feature_channels": 16, "train_samples": 8})
    return runtime


def frames_of(device="devA", round_=0, seed=1, max_chunk=700):
    g = torch.Generator().manual_seed(seed)
    upload = FeatureUpload(device, round_, "train", np.arange(8, dtype=np.int64), torch.rand(8, 16, 4, 4, generator=g),
                           torch.randn(8, 4, generator=g), torch.randint(0, 4, (8,), generator=g))
    arrays, meta = P.upload_to_arrays(upload, "fp16")
    frames = P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device=device, round_=round_, meta=meta,
                              max_chunk=max_chunk)
    assert len(frames) >= 3
    return frames, meta


def wire(frames):
    return sum(map(len, frames))


def send(runtime, device, frames):
    for frame in frames:
        runtime.handle(runtime.topics.up(device), frame)


def test_duplicate_chunks_and_whole_copies_are_resent_bytes_not_upload(tmp_path):
    runtime = make_runtime(tmp_path)
    frames, meta = frames_of()
    send(runtime, "devA", frames[:2] + frames[:1] + frames[2:])  # chunk 0 arrives twice (a QoS 1 redelivery)
    assert "devA" in runtime.strategy.train_uploads
    send(runtime, "devA", frames[1:])                            # late copies of a transfer already judged
    again, _ = frames_of()                                       # the same upload as a new transfer (a re-send)
    send(runtime, "devA", again)
    device = runtime.registry.devices["devA"]
    assert device["bytes_up"] == wire(frames)
    assert device["bytes_resent"] == len(frames[0]) + wire(frames[1:]) + wire(again)
    assert device["bytes_rejected"] == 0 and not runtime.registry.rejections
    assert device["raw_fp32_bytes"] == meta["raw_fp32_bytes"]    # credited once
    row = {"round": 0, "participants": ["devA"]}
    runtime.strategy.finish_row(row, 0.0)
    assert row["bytes_up"] == {"devA": wire(frames)} and row["bytes_rejected"] == {}
    assert row["bytes_resent"] == {"devA": device["bytes_resent"]}
    assert row["upload_compression_ratio"] == pytest.approx(meta["raw_fp32_bytes"] / wire(frames))
    final = runtime.report()["final"]
    assert (final["bytes_up"], final["bytes_resent"], final["bytes_rejected"]) == \
        (wire(frames), device["bytes_resent"], 0)
    assert final["upload_compression_ratio"] == pytest.approx(meta["raw_fp32_bytes"] / wire(frames))


def test_rejected_and_abandoned_transfers_are_rejected_bytes_not_upload(tmp_path):
    runtime = make_runtime(tmp_path)
    stale, _ = frames_of("devB", round_=-1, seed=2)      # the runtime is at round 0: stale_round
    send(runtime, "devB", stale)
    header, body = P.decode_frame(frames_of("devB", seed=3)[0][0])
    header["crc32"] ^= 1                                  # a chunk failing its crc32: refused on its own
    bad = P.encode_frame({k: v for k, v in header.items() if k != "v"}, body)
    send(runtime, "devB", [bad])
    partial = frames_of("devB", seed=4)[0][:2]           # a transfer its sender gave up on
    send(runtime, "devB", partial)
    assert runtime.ingest.expired() == []
    assert len(runtime.ingest.expired(now=1e12)) == 1     # what the runtime's pump does after transfer_timeout_s
    frames, _ = frames_of("devB", seed=5)                 # then an accepted one
    send(runtime, "devB", frames)
    partial_b = frames_of("devB", seed=6)[0][:1]          # open when the device re-registers: its sender is gone
    send(runtime, "devB", partial_b)
    runtime.register("devB", {"num_classes": 4, "feature_channels": 16, "train_samples": 8})
    device = runtime.registry.devices["devB"]
    assert runtime.registry.rejections["stale_round"] == 1 and runtime.registry.rejections["bad_checksum"] == 1
    assert device["bytes_up"] == wire(frames) and device["bytes_resent"] == 0
    assert device["bytes_rejected"] == wire(stale) + len(bad) + wire(partial) + wire(partial_b)
    row = {"round": 0, "participants": ["devB"]}
    runtime.strategy.finish_row(row, 0.0)
    assert row["bytes_up"] == {"devB": wire(frames)} and row["bytes_rejected"] == {"devB": device["bytes_rejected"]}
    final = runtime.report()["final"]
    assert final["bytes_up"] == wire(frames) and final["bytes_rejected"] == device["bytes_rejected"]


def test_chunks_of_a_quarantined_device_are_rejected_bytes(tmp_path):
    runtime = make_runtime(tmp_path)
    runtime.registry.devices["devA"]["quarantined_until"] = 1e12
    frames, _ = frames_of()
    send(runtime, "devA", frames)
    device = runtime.registry.devices["devA"]
    assert device["bytes_up"] == 0 and device["bytes_rejected"] == wire(frames)
