"""Hypothesis generators of malformed wire messages (tests/test_fuzz.py and bench/fuzz.py; needs the dev extra).

Every generated message is invalid by construction (random bytes, a corrupted body, a header field of the
wrong type or value, a missing field, or a well-framed transfer whose content is wrong), so a correct
receiver rejects each one with a reason and accepts none.
"""
from __future__ import annotations

import hashlib
import json
import struct
import uuid
import zlib

import numpy as np
import torch
from hypothesis import strategies as st

from edge_sdk import protocol as P
from edge_sdk.messages import FeatureUpload

RUN = "fuzz"
DEVICE = "devA"
N = 30  # devA's samples: ids 0..29, 4 x 5 x 5 features, 10 classes


def valid_upload(seed: int = 0, round_: int = 0) -> FeatureUpload:
    g = torch.Generator().manual_seed(seed)
    return FeatureUpload(DEVICE, round_, "train", np.arange(N, dtype=np.int64), torch.rand(N, 4, 5, 5, generator=g),
                         torch.randn(N, 10, generator=g), torch.randint(0, 10, (N,), generator=g))


def valid_upload_frames(seed: int = 0, max_chunk: int = 1 << 20) -> list[bytes]:
    arrays, meta = P.upload_to_arrays(valid_upload(seed), "fp16")
    return P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device=DEVICE, round_=0, meta=meta, max_chunk=max_chunk)


def _frame(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header, separators=(",", ":")).encode()
    return P.MAGIC + struct.pack(">I", len(raw)) + raw + body


def _split(frame: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack(">I", frame[4:8])
    return json.loads(frame[8:8 + n]), frame[8 + n:]


def _transfer(blob: bytes, meta, round_: int = 0) -> bytes:
    """A single-chunk transfer with correct framing and checksums around ``blob``."""
    header = {"v": P.PROTOCOL_VERSION, "type": P.CHUNK, "run": RUN, "device": DEVICE, "round": round_,
              "transfer": uuid.uuid4().hex, "index": 0, "count": 1,  # fresh: never a duplicate of an earlier one
              "size": len(blob), "crc32": zlib.crc32(blob), "sha256": hashlib.sha256(blob).hexdigest(), "meta": meta}
    return _frame(header, blob)


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=6)
not_int = json_values.filter(lambda v: type(v) is not int)
not_str = json_values.filter(lambda v: not isinstance(v, str))

# header field -> values that make the frame invalid
WRONG_FIELD = {
    "v": json_values.filter(lambda v: not (type(v) is int and v == P.PROTOCOL_VERSION)),
    "type": st.text(max_size=12).filter(lambda t: t not in P.CONTROL_TYPES | {P.CHUNK}) | not_str,
    "run": st.text(max_size=12).filter(lambda t: t != RUN) | not_str,
    "device": st.text(max_size=12).filter(lambda t: t != DEVICE) | not_str,
    "round": not_int | st.integers(min_value=1) | st.integers(max_value=-1),
    "transfer": not_str | st.just("") | st.text(min_size=65, max_size=80),
    "index": not_int | st.integers(min_value=1) | st.integers(max_value=-1),
    "count": not_int | st.integers(max_value=0) | st.integers(min_value=10 ** 7),  # > size + 1
    "size": not_int | st.integers(max_value=-1),
    "crc32": not_int | st.integers(min_value=2 ** 32),
    "sha256": not_str | st.text(max_size=10),
    "meta": json_values.filter(lambda v: not isinstance(v, dict)),
}


@st.composite
def random_bytes(draw):
    payload = draw(st.binary(max_size=2048))
    return payload if not payload.startswith(P.MAGIC) else b"X" + payload


@st.composite
def corrupted_body(draw):
    header, body = _split(valid_upload_frames(seed=draw(st.integers(1, 50)))[0])
    i = draw(st.integers(0, len(body) - 1))
    flipped = bytes([body[i] ^ draw(st.integers(1, 255))])
    return _frame(header, body[:i] + flipped + body[i + 1:])


@st.composite
def broken_prefix(draw):
    frame = valid_upload_frames(seed=1)[0]
    (n,) = struct.unpack(">I", frame[4:8])
    cut = draw(st.integers(0, 8 + n - 1))  # ends inside the prefix or the header
    return frame[:cut] if draw(st.booleans()) else frame[:4] + struct.pack(">I", draw(st.integers(n + len(frame), 2 ** 32 - 1))) + frame[8:]


@st.composite
def wrong_header_field(draw):
    header, body = _split(valid_upload_frames(seed=draw(st.integers(1, 50)))[0])
    field = draw(st.sampled_from(sorted(WRONG_FIELD) + ["<missing>"]))
    if field == "<missing>":
        header.pop(draw(st.sampled_from(sorted(WRONG_FIELD))))
    else:
        header[field] = draw(WRONG_FIELD[field])
    return _frame(header, body)


CONTENT_FAULTS = ("random_blob", "missing_array", "extra_shape", "nan", "huge", "labels", "dtype", "foreign_ids",
                  "duplicate_ids", "bad_meta", "bad_codec", "bad_split", "stale_round", "future_round", "kind")


@st.composite
def wrong_content(draw):
    """A perfectly framed, checksummed transfer whose content is wrong in one way."""
    fault = draw(st.sampled_from(CONTENT_FAULTS))
    arrays, meta = P.upload_to_arrays(valid_upload(seed=draw(st.integers(1, 50))), "fp16")
    arrays = {k: v.copy() for k, v in arrays.items()}
    round_ = 0
    if fault == "random_blob":
        return _transfer(draw(st.binary(max_size=512)), meta)
    if fault == "missing_array":
        arrays.pop(draw(st.sampled_from(sorted(arrays))))
    elif fault == "extra_shape":
        key = draw(st.sampled_from(sorted(arrays)))
        arrays[key] = arrays[key][: max(0, len(arrays[key]) - draw(st.integers(1, 5)))]
    elif fault in ("nan", "huge"):
        key = draw(st.sampled_from([k for k in arrays if arrays[k].dtype.kind == "f"]))
        arrays[key].flat[draw(st.integers(0, arrays[key].size - 1))] = np.nan if fault == "nan" else 6e4
        if fault == "huge" and key != "logits" and not key.startswith("features"):
            arrays["logits"].flat[0] = 6e4
    elif fault == "labels":
        arrays["labels"][draw(st.integers(0, N - 1))] = draw(st.sampled_from([-1, 10, 2 ** 40]))
    elif fault == "dtype":
        key = draw(st.sampled_from(sorted(arrays)))
        arrays[key] = arrays[key].astype(np.int32 if arrays[key].dtype.kind == "f" else np.float32)
    elif fault == "foreign_ids":
        arrays["sample_ids"] = arrays["sample_ids"] + draw(st.integers(1, 1000))
    elif fault == "duplicate_ids":
        arrays["sample_ids"][1] = arrays["sample_ids"][0]
    elif fault == "bad_meta":
        meta = {k: draw(json_values) for k in meta}
    elif fault == "bad_codec":
        meta = {**meta, "codec": draw(st.text(max_size=8).filter(lambda c: c not in P.CODECS) | not_str)}
    elif fault == "bad_split":
        meta = {**meta, "split": draw(st.text(max_size=8).filter(lambda c: c not in ("train", "test")) | not_str)}
    elif fault == "stale_round":
        round_ = draw(st.integers(-5, -1))
    elif fault == "future_round":
        round_ = draw(st.integers(1, 5))
    elif fault == "kind":
        meta = {**meta, "kind": draw(st.sampled_from([P.KIND_MODEL_UPDATE, P.KIND_SOFT_LABELS, P.KIND_MODEL, "x"]))}
    return _transfer(P.pack_arrays(arrays), meta, round_)


def malformed_messages(downlink: bool = False):
    """(topic, payload) pairs on devA's uplink (or downlink), each one malformed."""
    topics = P.Topics(RUN)
    topic = topics.down(DEVICE) if downlink else topics.up(DEVICE)
    payloads = st.one_of(random_bytes(), corrupted_body(), broken_prefix(), wrong_header_field(), wrong_content())
    return payloads.map(lambda p: (topic, p))
