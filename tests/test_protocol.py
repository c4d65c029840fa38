import json
import random
import struct
import zlib

import numpy as np
import pytest
import torch

from edge_sdk import protocol as P
from edge_sdk.messages import FeatureUpload, SoftLabels
from edgefl_core.transport import MemoryBus, topic_matches


def make_upload(n=40, c=4, hw=6, seed=0, split="train"):
    g = torch.Generator().manual_seed(seed)
    features = torch.relu(torch.randn(n, c, hw, hw, generator=g))
    return FeatureUpload("dev1", 3, split, np.arange(100, 100 + n, dtype=np.int64), features,
                         torch.randn(n, 10, generator=g), torch.randint(0, 10, (n,), generator=g))


def roundtrip(upload, codec, max_chunk=4096, shuffle=False, duplicate=False):
    arrays, meta = P.upload_to_arrays(upload, codec)
    frames = P.chunk_transfer(P.pack_arrays(arrays), run="r", device="dev1", round_=3, meta=meta, max_chunk=max_chunk)
    if duplicate:
        frames = frames + frames[: len(frames) // 2 + 1]
    if shuffle:
        random.Random(0).shuffle(frames)
    reassembler, done = P.Reassembler(), []
    for frame in frames:
        header, body = P.decode_frame(frame)
        result = reassembler.add(header, body, len(frame))
        if result is not None:
            done.append(result)
    assert len(done) == 1
    return P.arrays_to_upload(P.unpack_arrays(done[0].blob), done[0].meta, "dev1", 3), frames, reassembler


@pytest.mark.parametrize("codec, tol", [("fp32", 0.0), ("fp16", 2e-3), ("int8", None)])
def test_codecs_roundtrip(codec, tol):
    upload = make_upload()
    got, _, _ = roundtrip(upload, codec)
    assert (got.sample_ids == upload.sample_ids).all() and torch.equal(got.labels, upload.labels)
    err = (got.features - upload.features).abs()
    if codec == "int8":  # per-channel affine: error <= half a step of that channel's range
        step = (upload.features.amax(dim=(0, 2, 3)) - upload.features.amin(dim=(0, 2, 3))) / 255
        assert (err <= step.view(1, -1, 1, 1) / 2 + 1e-6).all()
    else:
        assert err.max() <= tol * upload.features.abs().max()


def test_int8_compresses_at_least_3x_vs_fp32():
    upload = make_upload(n=200, c=16, hw=14)
    arrays, meta = P.upload_to_arrays(upload, "int8")
    assert meta["raw_fp32_bytes"] / len(P.pack_arrays(arrays)) >= 3


def test_out_of_order_and_duplicate_chunks_assemble_once():
    upload = make_upload(n=120)
    got, frames, reassembler = roundtrip(upload, "fp32", max_chunk=2000, shuffle=True, duplicate=True)
    assert len(frames) > 10 and reassembler.duplicates > 0
    assert torch.equal(got.features, upload.features)
    header, body = P.decode_frame(frames[0])  # a late duplicate after completion is dropped, not re-delivered
    assert reassembler.add(header, body) is None


def test_bad_chunk_checksum_and_bad_transfer_digest():
    arrays, meta = P.upload_to_arrays(make_upload(), "fp16")
    frames = P.chunk_transfer(P.pack_arrays(arrays), run="r", device="d", round_=0, meta=meta, max_chunk=1000)
    header, body = P.decode_frame(frames[1])
    with pytest.raises(P.ProtocolError) as e:
        P.Reassembler().add(header, body[:-1] + bytes([body[-1] ^ 1]))
    assert e.value.reason == "bad_checksum"
    # consistent crc but the whole transfer does not hash to its sha256
    reassembler = P.Reassembler()
    for i, frame in enumerate(frames):
        header, body = P.decode_frame(frame)
        if i == 1:
            body = bytes(len(body))
            header["crc32"] = zlib.crc32(body)
        if i == len(frames) - 1:
            with pytest.raises(P.ProtocolError, match="sha256"):
                reassembler.add(header, body)
        else:
            reassembler.add(header, body)


def test_transfers_expire():
    arrays, meta = P.upload_to_arrays(make_upload(), "fp32")
    frames = P.chunk_transfer(P.pack_arrays(arrays), run="r", device="d", round_=0, meta=meta, max_chunk=1000)
    reassembler = P.Reassembler(timeout_s=10)
    header, body = P.decode_frame(frames[0])
    reassembler.add(header, body, now=0.0)
    assert reassembler.open_transfers == 1
    assert reassembler.expire(now=5.0) == [] and len(reassembler.expire(now=11.0)) == 1
    assert reassembler.open_transfers == 0


OLD = json.dumps({"v": 99, "type": "x", "run": "r", "device": "d", "round": 0}).encode()


@pytest.mark.parametrize("payload, reason", [
    (b"XXXX" + bytes(10), "bad_magic"),
    (P.MAGIC + struct.pack(">I", 500) + b"{}", "truncated"),
    (P.MAGIC + struct.pack(">I", 3) + b"{x}", "bad_header"),
    (P.MAGIC + struct.pack(">I", 2) + b"[]", "bad_header"),
    (P.encode_frame({"type": "chunk", "run": "r", "device": "d"}), "bad_header"),  # no round
    (P.MAGIC + struct.pack(">I", len(OLD)) + OLD, "bad_version"),
])
def test_malformed_frames_are_rejected_with_a_reason(payload, reason):
    with pytest.raises(P.ProtocolError) as e:
        P.decode_frame(payload)
    assert e.value.reason == reason


def test_oversized_chunk_and_transfer():
    with pytest.raises(P.ProtocolError) as e:
        P.decode_frame(P.encode_frame({"type": "chunk", "run": "r", "device": "d", "round": 0}, bytes(100)), max_body=10)
    assert e.value.reason == "oversized"
    header = {"type": "chunk", "run": "r", "device": "d", "round": 0, "transfer": "t", "index": 0, "count": 1,
              "size": 10 ** 12, "crc32": 0, "sha256": "0" * 64, "meta": {}}
    with pytest.raises(P.ProtocolError) as e:
        P.Reassembler(max_transfer_bytes=1 << 20).add(header, b"")
    assert e.value.reason == "oversized"


def test_zstd_bomb_is_capped():
    blob = P.pack_arrays({"x": np.zeros(10_000_000, np.uint8)})
    assert len(blob) < 10_000
    with pytest.raises(P.ProtocolError) as e:
        P.unpack_arrays(blob, max_bytes=1_000_000)
    assert e.value.reason == "oversized"


@pytest.mark.parametrize("mutate, reason", [
    (lambda a: a.update(sample_ids=a["sample_ids"].astype(np.float64)), "bad_dtype"),
    (lambda a: a.update(labels=a["labels"][:-1]), "bad_shape"),
    (lambda a: a.update(logits=np.full_like(a["logits"], np.nan)), "non_finite"),
    (lambda a: a.update(features=np.full_like(a["features"], np.inf)), "non_finite"),
    (lambda a: a.update(features=a["features"].astype(np.float64)), "bad_dtype"),
    (lambda a: a.pop("logits"), "bad_payload"),
])
def test_bad_upload_payloads(mutate, reason):
    arrays, meta = P.upload_to_arrays(make_upload(), "fp16")
    mutate(arrays)
    with pytest.raises(P.ProtocolError) as e:
        P.arrays_to_upload(P.unpack_arrays(P.pack_arrays(arrays)), meta, "dev1", 0)
    assert e.value.reason == reason


def test_not_safetensors_or_not_zstd():
    with pytest.raises(P.ProtocolError) as e:
        P.unpack_arrays(b"definitely not zstd")
    assert e.value.reason == "bad_compression"
    import zstandard
    with pytest.raises(P.ProtocolError) as e:
        P.unpack_arrays(zstandard.ZstdCompressor().compress(b"\x00" * 64))
    assert e.value.reason == "bad_payload"


def test_soft_labels_roundtrip():
    message = SoftLabels("dev1", 2, np.array([5, 3, 9], dtype=np.int64), torch.randn(3, 10))
    arrays, meta = P.soft_labels_to_arrays(message)
    got = P.arrays_to_soft_labels(P.unpack_arrays(P.pack_arrays(arrays)), "dev1", 2)
    assert (got.sample_ids == message.sample_ids).all() and torch.equal(got.logits, message.logits)


def test_topics_and_matching():
    t = P.Topics("run1")
    assert t.up("dev7") == "edgefl/v1/run1/dev/dev7/up" and t.device_of(t.up("dev7")) == "dev7"
    assert t.device_of("edgefl/v1/run2/dev/x/up") is None
    assert topic_matches(t.all_up, t.up("a")) and not topic_matches(t.all_up, t.down("a"))
    assert topic_matches("a/#", "a/b/c") and not topic_matches("a/+", "a/b/c")
    with pytest.raises(ValueError):
        P.Topics("bad/run")
    with pytest.raises(ValueError):
        P.check_device_id("dev+1")


def test_memory_bus_retained_and_will():
    bus, got = MemoryBus(), []
    a = bus.client("a", will=("s/a", b"offline"))
    a.publish("s/a", b"online", retain=True)
    b = bus.client("b")
    b.subscribe("s/+", lambda topic, payload: got.append(payload))
    assert got == [b"online"]
    a.crash()
    assert got == [b"online", b"offline"]


def test_model_state_roundtrip_including_scalar_buffers():
    from model_zoo import create_model
    model = create_model("resnet8", in_channels=1)
    reference = model.state_dict()
    for codec, tol in (("fp32", 0), ("fp16", 1e-2)):
        arrays, meta = P.state_to_arrays(reference, codec)
        state = P.arrays_to_state(P.unpack_arrays(P.pack_arrays(arrays)), reference)
        model.load_state_dict(state)  # shapes, dtypes and scalar buffers all line up
        assert all(torch.allclose(state[k].float(), reference[k].float(), atol=tol) for k in reference)
    bad = dict(arrays)
    bad["stem.0.weight"] = np.full_like(bad["stem.0.weight"], np.nan)
    with pytest.raises(P.ProtocolError) as e:
        P.arrays_to_state(bad, reference)
    assert e.value.reason == "non_finite"
    bad = dict(arrays)
    bad["stem.0.weight"] = bad["stem.0.weight"][:1]
    with pytest.raises(P.ProtocolError) as e:
        P.arrays_to_state(bad, reference)
    assert e.value.reason == "bad_shape"
