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
    payload = draw(st.binary(min_size=1, max_size=2048))  # empty = a retained deletion: ignored, not rejected
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
    cut = draw(st.integers(1, 8 + n - 1))  # ends inside the prefix or the header (empty: a retained deletion)
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


# ---------------------------------------------------------------------------------------------------------
# structure-aware fuzzing with an oracle: one path of a valid message's JSON header mutated at a time

PLACEHOLDER = "\x00mutant\x00"
REGISTER_DEVICE, HEARTBEAT_DEVICE = "devR", "devH"
STRUCTURAL = ("deep", "huge_int", "nonfinite", "oversized")   # invalid wherever they are
MUTATIONS = STRUCTURAL + ("wrong_type", "long_string", "missing")
TYPE_SAMPLES = [None, True, 1.5, 7, "s", [], {}]


def _json_type(value) -> str:
    return "bool" if isinstance(value, bool) else "int" if isinstance(value, int) else type(value).__name__


def header_paths(value, prefix: tuple = ()) -> list[tuple]:
    """Every path below the root of a parsed JSON header (dict keys and list indices)."""
    paths = []
    children = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in children:
        paths.append(prefix + (key,))
        paths.extend(header_paths(child, prefix + (key,)))
    return paths


def _get(value, path):
    for key in path:
        value = value[key]
    return value


def _with(header: dict, path: tuple, new) -> dict:
    copy = json.loads(json.dumps(header))
    parent = _get(copy, path[:-1])
    if new is _MISSING:
        del parent[path[-1]]
    else:
        parent[path[-1]] = new
    return copy


_MISSING = object()


@st.composite
def mutated_header(draw, header: dict, paths: list[tuple] | None = None):
    """``(raw JSON text, path, mutation, new value or None)`` with one path of ``header`` mutated."""
    paths = paths or header_paths(header)
    path = draw(st.sampled_from(paths))
    mutation = draw(st.sampled_from(MUTATIONS))
    if mutation == "missing" and not isinstance(_get(header, path[:-1]), dict):
        mutation = "wrong_type"
    if mutation == "missing":
        return json.dumps(_with(header, path, _MISSING)), path, mutation, None
    if mutation in ("wrong_type", "long_string"):
        old = _get(header, path)
        if mutation == "long_string":
            new = draw(st.text(min_size=1, max_size=8)) * draw(st.integers(65, 3000))
        else:
            new = draw(st.sampled_from([v for v in TYPE_SAMPLES if _json_type(v) != _json_type(old)])
                       | json_values.filter(lambda v: _json_type(v) != _json_type(old)))
        return json.dumps(_with(header, path, new)), path, mutation, new
    raw = {"deep": lambda: "[" * (d := draw(st.integers(9, 20000))) + "]" * d,
           "huge_int": lambda: "-" * draw(st.booleans()) + "9" * draw(st.integers(4301, 20000)),
           "nonfinite": lambda: draw(st.sampled_from(["NaN", "Infinity", "-Infinity"])
                                     | st.integers(309, 99999).map(lambda e: f"1e{e}")),
           "oversized": lambda: json.dumps("x" * draw(st.integers(70_000, 200_000)))}[mutation]()
    text = json.dumps(_with(header, path, PLACEHOLDER)).replace(json.dumps(PLACEHOLDER), raw)
    return text, path, mutation, None


def _raw_frame(text: str, body: bytes = b"") -> bytes:
    raw = text.encode()
    return P.MAGIC + struct.pack(">I", len(raw)) + raw + body


# -- the oracle: which mutations make a message invalid ---------------------------------------------------
# (True: must be rejected with a named reason; None: may be accepted or rejected, must not crash)

TOP = {"v", "type", "run", "device", "round"}
CHUNK_FIELDS = TOP | {"transfer", "index", "count", "size", "crc32", "sha256", "meta"}
META_REQUIRED = {"kind", "split", "codec"}
META_TYPED = META_REQUIRED | {"samples", "feature_shape", "raw_fp32_bytes", "metrics"}
REGISTER_REQUIRED = {"num_classes", "feature_channels"}
REGISTER_TYPED = REGISTER_REQUIRED | {"train_samples", "test_samples", "profile", "input_shape", "pid", "edge_params"}
NULLABLE = {"profile", "input_shape", "pid", "edge_params", "metrics"}


def uplink_oracle(kind: str, path: tuple, mutation: str, new) -> bool | None:
    if mutation in STRUCTURAL:
        return True
    top = path[0]
    if len(path) == 1 and (top in TOP or (kind == "chunk" and top in CHUNK_FIELDS)):
        return True
    if kind == "chunk" and top == "meta":
        field = path[1]
        if len(path) == 2:
            if mutation == "missing":
                return True if field in META_REQUIRED else None
            if field in META_TYPED:
                return None if (field in NULLABLE and new is None) else True
            return None
        return True if field == "feature_shape" else None  # metrics' own values are free
    if kind == "register" and top == "data":
        if len(path) == 1:
            return None if isinstance(new, dict) else True
        field = path[1]
        if len(path) == 2:
            if mutation == "missing":
                return True if field in REGISTER_REQUIRED else None
            if field in REGISTER_TYPED:
                return None if (field in NULLABLE and new is None) else True
            return None
        return True if field == "input_shape" else None
    if kind == "heartbeat" and top == "data" and len(path) == 1:
        return None if isinstance(new, dict) or mutation == "missing" else True
    return None


def base_uplink_messages() -> dict[str, tuple[str, dict, bytes]]:
    """kind -> (topic, header, body) of a valid message of that kind."""
    topics = P.Topics(RUN)
    arrays, meta = P.upload_to_arrays(valid_upload(0), "fp16")
    blob = P.pack_arrays(arrays)
    chunk = {"v": P.PROTOCOL_VERSION, "type": P.CHUNK, "run": RUN, "device": DEVICE, "round": 0, "transfer": "t",
             "index": 0, "count": 1, "size": len(blob), "crc32": zlib.crc32(blob),
             "sha256": hashlib.sha256(blob).hexdigest(), "meta": meta}
    register = {"v": P.PROTOCOL_VERSION, "type": P.REGISTER, "run": RUN, "device": REGISTER_DEVICE, "round": -1,
                "data": {"num_classes": 10, "feature_channels": 4, "train_samples": 30, "test_samples": 0,
                         "profile": "host", "input_shape": None, "pid": 42, "edge_params": 1000, "model": "m",
                         "trainer": "backprop", "model_kwargs": {"width": 1}, "codec": "int8"}}
    heartbeat = {"v": P.PROTOCOL_VERSION, "type": P.HEARTBEAT, "run": RUN, "device": HEARTBEAT_DEVICE, "round": 0,
                 "data": {"step_time_s": 0.1, "rss_mb": 100.0, "bytes_up": 10, "profile": "host", "rejected": 0}}
    return {"chunk": (topics.up(DEVICE), chunk, blob), "register": (topics.up(REGISTER_DEVICE), register, b""),
            "heartbeat": (topics.heartbeat(HEARTBEAT_DEVICE), heartbeat, b"")}


@st.composite
def structured_uplink(draw):
    """``(topic, payload, invalid, description)``: a valid uplink message with one header path mutated."""
    kind = draw(st.sampled_from(["chunk", "register", "heartbeat"]))
    topic, header, body = base_uplink_messages()[kind]
    if kind == "chunk":
        header = {**header, "transfer": uuid.uuid4().hex}  # never a duplicate of an earlier transfer
    text, path, mutation, new = draw(mutated_header(header))
    return topic, _raw_frame(text, body), uplink_oracle(kind, path, mutation, new), f"{kind} {'.'.join(map(str, path))} {mutation}"


def base_downlink_messages(session: str) -> dict[str, tuple[str, dict, bytes]]:
    """kind -> (topic, header, body) of valid runtime -> agent messages."""
    topics = P.Topics(RUN)
    recipe = {"algorithm": "fedgkt", "edge": {"model": "resnet8_gkt", "epochs": 1}, "codec": "int8",
              "model_codec": "fp16"}
    base = {"v": P.PROTOCOL_VERSION, "run": RUN, "round": 0}
    labels = P.soft_labels_to_arrays(P.SoftLabels(DEVICE, 0, np.arange(4, dtype=np.int64), torch.zeros(4, 4)))
    blob = P.pack_arrays(labels[0])
    return {
        "hello": (topics.control, {**base, "type": P.HELLO, "device": "*",
                                   "data": {"session": session, "recipe": recipe, "edge_overrides": {}}}, b""),
        "round": (topics.control, {**base, "type": P.ROUND, "device": "*",
                                   "data": {"session": session, "recipe": recipe, "eval": True, "soft_labels_to": [DEVICE],
                                            "soft_labels_round": None, "soft_labels_wait_s": 1.0}}, b""),
        "shutdown": (topics.control, {**base, "type": P.SHUTDOWN, "device": "*", "data": {"session": "other"}}, b""),
        "ack": (topics.down(DEVICE), {**base, "type": P.ACK, "device": DEVICE,
                                      "data": {"transfer": "t", "final": False, "high": 3, "missing": [[1, 2]],
                                               "more": False, "seq": 4}}, b""),
        "chunk": (topics.down(DEVICE), {**base, "type": P.CHUNK, "device": DEVICE, "transfer": "s", "index": 0,
                                        "count": 1, "size": len(blob), "crc32": zlib.crc32(blob),
                                        "sha256": hashlib.sha256(blob).hexdigest(), "meta": labels[1]}, blob),
    }


@st.composite
def structured_downlink(draw, session: str = "s1"):
    """``(topic, payload, invalid, description)`` for the agent: structural mutations and the envelope's fields
    are invalid; what a field inside means is the agent's to judge (never a crash)."""
    kind = draw(st.sampled_from(["hello", "round", "shutdown", "ack", "chunk"]))
    topic, header, body = base_downlink_messages(session)[kind]
    if kind == "chunk":
        header = {**header, "transfer": uuid.uuid4().hex}
    text, path, mutation, new = draw(mutated_header(header))
    invalid = True if mutation in STRUCTURAL or (len(path) == 1 and path[0] in TOP - {"device"}) else None
    return topic, _raw_frame(text, body), invalid, f"{kind} {'.'.join(map(str, path))} {mutation}"
