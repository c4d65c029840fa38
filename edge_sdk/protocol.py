"""The edgefl wire protocol (v1): topics, the frame envelope, tensor codecs, chunking and reassembly.

Everything that crosses the broker is built and parsed here; see ``docs/PROTOCOL.md``.

Frame = ``b"EFL1"`` | u32 header length (big-endian) | UTF-8 JSON header | body bytes.
The JSON header always carries ``v`` (protocol version), ``type``, ``run``, ``device`` and
``round``. Tensors travel only as safetensors blobs (named raw arrays), compressed with zstd and
cut into chunks; nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import safetensors.numpy
import torch
import zstandard

from edge_sdk.messages import FeatureUpload, MessageError, SoftLabels

PROTOCOL_VERSION = 1
MAGIC = b"EFL1"
MAX_HEADER_BYTES = 64 * 1024
DEFAULT_CHUNK_BYTES = 256 * 1024          # keeps every MQTT message under EMQX-style 1 MB limits
DEFAULT_MAX_TRANSFER_BYTES = 1 << 30      # decompressed size cap (zip-bomb guard)

# message types
REGISTER = "register"          # device -> cloud: profile, sample counts, model
STATUS = "status"              # device -> cloud, retained: online / offline (Last Will)
HEARTBEAT = "heartbeat"        # device -> cloud: metrics
CHUNK = "chunk"                # either way: one piece of a transfer (features up, soft labels down)
ROUND = "round"                # cloud -> device(s): train round r, deadline, what to upload
SHUTDOWN = "shutdown"          # cloud -> devices: the run is over
ACK = "ack"                    # cloud -> device: transfer accepted (or rejected, with a reason)
HELLO = "hello"                # cloud -> devices, retained: a runtime session is up (devices (re-)register)
CONTROL_TYPES = {REGISTER, STATUS, HEARTBEAT, ROUND, SHUTDOWN, ACK, HELLO}

# transfer kinds (what a completed chunk sequence decodes to)
KIND_UPLOAD = "upload"
KIND_SOFT_LABELS = "soft_labels"
KIND_MODEL = "model"                # cloud -> device: the global model of a FedAvg round
KIND_MODEL_UPDATE = "model_update"  # device -> cloud: locally trained weights
KIND_EXTRACTOR = "extractor"        # cloud -> device: averaged FedGKT feature extractor
EXTRACTOR_PREFIX = "extractor."     # upload arrays carrying the device's extractor (when averaging)
MODEL_CODECS = ("fp32", "fp16")

CODECS = ("fp32", "fp16", "int8")


class ProtocolError(ValueError):
    """A frame or transfer is malformed; ``reason`` is a short machine-readable tag for counters."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------
# topics


@dataclass(frozen=True)
class Topics:
    """``edgefl/v1/<run>/...``: per-device uplink/downlink/status/heartbeat plus a run-wide control topic."""

    run: str
    root: str = "edgefl/v1"

    def __post_init__(self):
        for name, value in (("run", self.run),):
            if not value or any(c in value for c in "/+#\x00"):
                raise ValueError(f"{name} {value!r} must be non-empty and free of '/', '+', '#'")

    @property
    def base(self) -> str:
        return f"{self.root}/{self.run}"

    def up(self, device: str) -> str:
        return f"{self.base}/dev/{device}/up"

    def down(self, device: str) -> str:
        return f"{self.base}/dev/{device}/down"

    def status(self, device: str) -> str:
        return f"{self.base}/dev/{device}/status"

    def heartbeat(self, device: str) -> str:
        return f"{self.base}/dev/{device}/hb"

    @property
    def control(self) -> str:
        return f"{self.base}/control"

    @property
    def all_up(self) -> str:
        return f"{self.base}/dev/+/up"

    @property
    def all_status(self) -> str:
        return f"{self.base}/dev/+/status"

    @property
    def all_heartbeat(self) -> str:
        return f"{self.base}/dev/+/hb"

    def device_of(self, topic: str) -> str | None:
        parts = topic.split("/")
        base = self.base.split("/")
        if len(parts) == len(base) + 3 and parts[:len(base)] == base and parts[len(base)] == "dev":
            return parts[len(base) + 1]
        return None


def check_device_id(device: str) -> str:
    if not device or len(device) > 128 or any(c in device for c in "/+#\x00 "):
        raise ValueError(f"device id {device!r} must be 1-128 characters without '/', '+', '#' or spaces")
    return device


# ---------------------------------------------------------------------------------------------
# frames


def encode_frame(header: dict, body: bytes = b"") -> bytes:
    header = {"v": PROTOCOL_VERSION, **header}
    raw = json.dumps(header, separators=(",", ":")).encode()
    if len(raw) > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", f"{len(raw)} bytes")
    return MAGIC + struct.pack(">I", len(raw)) + raw + body


def decode_frame(payload: bytes, max_body: int | None = None) -> tuple[dict, bytes]:
    """Parse and sanity-check a frame; every failure is a :class:`ProtocolError` with a reason."""
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise ProtocolError("bad_magic", f"frame starts with {payload[:4]!r}")
    (header_len,) = struct.unpack(">I", payload[4:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(payload):
        raise ProtocolError("truncated", f"header length {header_len} with {len(payload)} bytes in frame")
    try:
        header = json.loads(payload[8:8 + header_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError("bad_header", str(e)) from None
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header is not an object")
    if type(header.get("v")) is not int or header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {header.get('v')!r}, this side speaks {PROTOCOL_VERSION}")
    for key, typ in (("type", str), ("run", str), ("device", str), ("round", int)):
        if not isinstance(header.get(key), typ) or isinstance(header.get(key), bool):
            raise ProtocolError("bad_header", f"field {key!r} missing or not {typ.__name__}")
    body = payload[8 + header_len:]
    if max_body is not None and len(body) > max_body:
        raise ProtocolError("oversized", f"{len(body)} body bytes > limit {max_body}")
    return header, body


# ---------------------------------------------------------------------------------------------
# tensor codecs (features) and transfer payloads


def _quantize_int8(x: np.ndarray) -> dict[str, np.ndarray]:
    """Per-channel affine uint8: x ~= q * scale[c] + low[c]; channel axis 1 (N x C x H x W)."""
    c = x.shape[1]
    per_channel = np.moveaxis(x, 1, 0).reshape(c, -1)            # C x (N*H*W)
    low = per_channel.min(axis=1) if per_channel.size else np.zeros(c, np.float32)
    high = per_channel.max(axis=1) if per_channel.size else np.zeros(c, np.float32)
    scale = np.where(high > low, (high - low) / 255.0, 1.0).astype(np.float32)
    shape = (1, c) + (1,) * (x.ndim - 2)
    q = np.rint((x - low.reshape(shape)) / scale.reshape(shape))
    return {"features_q": np.clip(q, 0, 255).astype(np.uint8), "features_scale": scale,
            "features_low": low.astype(np.float32)}


def _dequantize_int8(arrays: dict[str, np.ndarray]) -> np.ndarray:
    q, scale, low = arrays["features_q"], arrays["features_scale"], arrays["features_low"]
    if q.ndim < 2 or scale.shape != (q.shape[1],) or low.shape != (q.shape[1],):
        raise ProtocolError("bad_shape", "int8 features need per-channel scale and low of length C")
    shape = (1, q.shape[1]) + (1,) * (q.ndim - 2)
    return q.astype(np.float32) * scale.reshape(shape) + low.reshape(shape)


def encode_features(features: np.ndarray, codec: str) -> dict[str, np.ndarray]:
    if codec == "fp32":
        return {"features": features.astype(np.float32, copy=False)}
    if codec == "fp16":
        return {"features": features.astype(np.float16)}
    if codec == "int8":
        return _quantize_int8(features.astype(np.float32, copy=False))
    raise ProtocolError("bad_codec", f"unknown codec {codec!r}; known: {', '.join(CODECS)}")


def decode_features(arrays: dict[str, np.ndarray], codec: str) -> np.ndarray:
    if codec in ("fp32", "fp16"):
        features = arrays.get("features")
        expected = np.float32 if codec == "fp32" else np.float16
        if features is None or features.dtype != expected:
            raise ProtocolError("bad_dtype", f"{codec} features must be {np.dtype(expected)}")
        return features.astype(np.float32)
    if codec == "int8":
        if any(k not in arrays for k in ("features_q", "features_scale", "features_low")):
            raise ProtocolError("bad_payload", "int8 features need features_q, features_scale, features_low")
        if arrays["features_q"].dtype != np.uint8:
            raise ProtocolError("bad_dtype", "features_q must be uint8")
        return _dequantize_int8(arrays)
    raise ProtocolError("bad_codec", f"unknown codec {codec!r}")


def pack_arrays(arrays: dict[str, np.ndarray], level: int = 3) -> bytes:
    return zstandard.ZstdCompressor(level=level).compress(safetensors.numpy.save(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()}))


def unpack_arrays(blob: bytes, max_bytes: int = DEFAULT_MAX_TRANSFER_BYTES) -> dict[str, np.ndarray]:
    try:
        with zstandard.ZstdDecompressor().stream_reader(blob) as reader:
            raw = reader.read(max_bytes + 1)
    except zstandard.ZstdError as e:
        raise ProtocolError("bad_compression", str(e)) from None
    if len(raw) > max_bytes:
        raise ProtocolError("oversized", f"decompressed transfer exceeds {max_bytes} bytes")
    try:
        return safetensors.numpy.load(raw)
    except Exception as e:  # safetensors raises its own SafetensorError / ValueError
        raise ProtocolError("bad_payload", f"not a safetensors blob ({e})") from None


def upload_to_arrays(upload: FeatureUpload, codec: str) -> tuple[dict[str, np.ndarray], dict]:
    arrays = encode_features(upload.features.float().numpy(), codec)
    arrays.update(sample_ids=upload.sample_ids.astype(np.int64), labels=upload.labels.numpy().astype(np.int64),
                  logits=upload.logits.float().numpy().astype(np.float16 if codec != "fp32" else np.float32))
    meta = {"kind": KIND_UPLOAD, "split": upload.split, "codec": codec, "samples": len(upload.sample_ids),
            "feature_shape": list(upload.features.shape[1:]), "metrics": upload.metrics,
            "raw_fp32_bytes": int(upload.features.numel() * 4 + upload.logits.numel() * 4
                                  + len(upload.sample_ids) * 16)}
    return arrays, meta


def arrays_to_upload(arrays: dict[str, np.ndarray], meta: dict, device: str, round_: int) -> FeatureUpload:
    for key in ("sample_ids", "labels", "logits"):
        if key not in arrays:
            raise ProtocolError("bad_payload", f"upload lacks {key!r}")
    if arrays["sample_ids"].dtype != np.int64 or arrays["labels"].dtype != np.int64:
        raise ProtocolError("bad_dtype", "sample_ids and labels must be int64")
    if arrays["logits"].dtype not in (np.float16, np.float32):
        raise ProtocolError("bad_dtype", f"logits must be float16/32, got {arrays['logits'].dtype}")
    features = decode_features(arrays, str(meta.get("codec")))
    split = meta.get("split")
    if split not in ("train", "test"):
        raise ProtocolError("bad_payload", f"unknown split {split!r}")
    upload = FeatureUpload(device, round_, split, arrays["sample_ids"].copy(), torch.from_numpy(features),
                           torch.from_numpy(arrays["logits"].astype(np.float32)), torch.from_numpy(arrays["labels"].copy()),
                           dict(meta.get("metrics") or {}))
    try:
        upload.validate()
    except MessageError as e:
        reason = "non_finite" if "NaN" in str(e) else "bad_shape"
        raise ProtocolError(reason, str(e)) from None
    return upload


def soft_labels_to_arrays(message: SoftLabels) -> tuple[dict[str, np.ndarray], dict]:
    return ({"sample_ids": message.sample_ids.astype(np.int64), "logits": message.logits.float().numpy()},
            {"kind": KIND_SOFT_LABELS, "samples": len(message.sample_ids)})


def arrays_to_soft_labels(arrays: dict[str, np.ndarray], device: str, round_: int) -> SoftLabels:
    if "sample_ids" not in arrays or "logits" not in arrays:
        raise ProtocolError("bad_payload", "soft labels need sample_ids and logits")
    if arrays["sample_ids"].dtype != np.int64 or arrays["logits"].dtype != np.float32:
        raise ProtocolError("bad_dtype", "soft labels: sample_ids int64, logits float32")
    message = SoftLabels(device, round_, arrays["sample_ids"].copy(), torch.from_numpy(arrays["logits"].copy()))
    try:
        message.validate()
    except MessageError as e:
        raise ProtocolError("non_finite" if "NaN" in str(e) else "bad_shape", str(e)) from None
    return message


def state_to_arrays(state: dict[str, torch.Tensor], codec: str = "fp32") -> tuple[dict[str, np.ndarray], dict]:
    """Model weights for the wire: floating tensors in the codec's dtype, integer buffers as int64."""
    if codec not in MODEL_CODECS:
        raise ProtocolError("bad_codec", f"unknown model codec {codec!r}; known: {', '.join(MODEL_CODECS)}")
    arrays, raw = {}, 0
    for name, tensor in state.items():
        value = tensor.detach().cpu()
        raw += value.numel() * 4
        if value.is_floating_point():
            arrays[name] = value.numpy().astype(np.float16 if codec == "fp16" else np.float32)
        else:
            arrays[name] = value.numpy().astype(np.int64)
    return arrays, {"codec": codec, "tensors": len(arrays), "raw_fp32_bytes": raw}


def arrays_to_state(arrays: dict[str, np.ndarray], reference: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Decode model weights; names and shapes must match ``reference`` and values must be finite."""
    state = {}
    for name, value in arrays.items():
        if value.dtype not in (np.float16, np.float32, np.int64):
            raise ProtocolError("bad_dtype", f"{name}: {value.dtype}")
        if value.dtype != np.int64 and not np.all(np.isfinite(value)):
            raise ProtocolError("non_finite", f"{name} contains NaN or Inf")
        state[name] = torch.from_numpy(value.astype(np.float32) if value.dtype == np.float16 else value.copy())
    if reference is not None:
        if set(state) != set(reference):
            raise ProtocolError("bad_shape", f"tensor names differ from the model's "
                                             f"(missing {sorted(set(reference) - set(state))[:3]}, "
                                             f"extra {sorted(set(state) - set(reference))[:3]})")
        for name, ref in reference.items():
            if ref.dim() == 0 and state[name].numel() == 1:
                state[name] = state[name].reshape(())  # safetensors stores scalars as shape (1,)
            if tuple(state[name].shape) != tuple(ref.shape):
                raise ProtocolError("bad_shape", f"{name}: {tuple(state[name].shape)}, expected {tuple(ref.shape)}")
            state[name] = state[name].to(ref.dtype)
    return state


# ---------------------------------------------------------------------------------------------
# chunking


_TRANSFER_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def new_transfer_id() -> str:
    return uuid.uuid4().hex


def chunk_transfer(blob: bytes, *, run: str, device: str, round_: int, meta: dict, max_chunk: int = DEFAULT_CHUNK_BYTES,
                   transfer_id: str | None = None) -> list[bytes]:
    """Cut a packed transfer into frames of at most ``max_chunk`` body bytes, each with its crc32."""
    if max_chunk <= 0:
        raise ValueError("max_chunk must be > 0")
    transfer_id = transfer_id or new_transfer_id()
    digest = hashlib.sha256(blob).hexdigest()
    count = max(1, -(-len(blob) // max_chunk))
    frames = []
    for index in range(count):
        body = blob[index * max_chunk:(index + 1) * max_chunk]
        header = {"type": CHUNK, "run": run, "device": device, "round": round_, "transfer": transfer_id,
                  "index": index, "count": count, "size": len(blob), "crc32": zlib.crc32(body), "sha256": digest}
        if index == 0:
            header["meta"] = meta
        frames.append(encode_frame(header, body))
    return frames


@dataclass
class CompletedTransfer:
    device: str
    round: int
    transfer: str
    meta: dict
    blob: bytes
    wire_bytes: int
    chunks: int


@dataclass
class _Pending:
    count: int
    size: int
    sha256: str
    round: int
    started: float
    parts: dict[int, bytes] = field(default_factory=dict)
    meta: dict | None = None
    wire_bytes: int = 0


class Reassembler:
    """Collect chunks into transfers; idempotent on (device, transfer id).

    Duplicates (QoS 1 redelivery, retries) and out-of-order chunks are fine; a chunk whose crc32
    or a transfer whose sha256 does not match is rejected; incomplete transfers expire after
    ``timeout_s``; a finished transfer id is remembered so late duplicates are dropped.
    """

    def __init__(self, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES, timeout_s: float = 300.0,
                 max_pending: int = 1024, remember: int = 65536, max_chunk: int = 16 << 20):
        self.max_transfer_bytes = max_transfer_bytes
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.max_chunk = max_chunk
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._done: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._remember = remember
        self.duplicates = 0

    def add(self, header: dict, body: bytes, wire_bytes: int | None = None, now: float | None = None
            ) -> CompletedTransfer | None:
        now = time.monotonic() if now is None else now
        transfer, index, count = header.get("transfer"), header.get("index"), header.get("count")
        size, crc, digest = header.get("size"), header.get("crc32"), header.get("sha256")
        if not all(type(v) is int for v in (index, count, size, crc)):  # strictly: no bools, floats or strings
            raise ProtocolError("bad_header", "chunk header needs integer index/count/size/crc32")
        if not isinstance(transfer, str) or not _TRANSFER_ID.fullmatch(transfer):
            raise ProtocolError("bad_header", f"transfer id {str(transfer)[:80]!r} is not 1-64 of [0-9A-Za-z_-]")
        if not isinstance(digest, str) or not _SHA256.fullmatch(digest):
            raise ProtocolError("bad_header", "sha256 must be 64 lowercase hex digits")
        if not 0 <= crc < 2 ** 32:
            raise ProtocolError("bad_header", f"crc32 {crc} out of range")
        device, round_ = header["device"], header["round"]
        key = (device, transfer)
        if key in self._done:
            self.duplicates += 1
            return None
        if size < 0 or not (0 <= index < count) or count > size + 1:
            raise ProtocolError("bad_header", f"chunk {index} of {count} for {size} bytes")
        if size > self.max_transfer_bytes:
            raise ProtocolError("oversized", f"transfer of {size} bytes > limit {self.max_transfer_bytes}")
        if len(body) > self.max_chunk:
            raise ProtocolError("oversized", f"chunk of {len(body)} bytes > limit {self.max_chunk}")
        if zlib.crc32(body) != crc:
            raise ProtocolError("bad_checksum", f"chunk {index} of transfer {transfer[:8]} fails its crc32")
        pending = self._pending.get(key)
        if pending is None:
            if len(self._pending) >= self.max_pending:
                raise ProtocolError("too_many_transfers", f"{len(self._pending)} transfers already open")
            pending = self._pending[key] = _Pending(count, size, digest, round_, now)
        elif (pending.count, pending.size, pending.sha256, pending.round) != (count, size, digest, round_):
            raise ProtocolError("bad_header", f"chunk {index} disagrees with earlier chunks of transfer {transfer[:8]}")
        if index in pending.parts:
            self.duplicates += 1
            return None
        pending.parts[index] = body
        pending.wire_bytes += wire_bytes if wire_bytes is not None else len(body)
        if index == 0:
            meta = header.get("meta")
            if not isinstance(meta, dict):
                self._pending.pop(key)
                raise ProtocolError("bad_header", "first chunk lacks its meta object")
            pending.meta = meta
        if len(pending.parts) < count:
            return None
        del self._pending[key]
        blob = b"".join(pending.parts[i] for i in range(count))
        if len(blob) != size or hashlib.sha256(blob).hexdigest() != digest:
            raise ProtocolError("bad_checksum", f"transfer {transfer[:8]} from {device} fails its sha256")
        self._done[key] = None
        while len(self._done) > self._remember:
            self._done.popitem(last=False)
        assert pending.meta is not None
        return CompletedTransfer(device, round_, transfer, pending.meta, blob, pending.wire_bytes, count)

    def expire(self, now: float | None = None) -> list[tuple[str, str]]:
        """Drop transfers idle longer than ``timeout_s``; returns their (device, transfer) keys."""
        now = time.monotonic() if now is None else now
        stale = [k for k, p in self._pending.items() if now - p.started > self.timeout_s]
        for k in stale:
            del self._pending[k]
        return stale

    def forget_device(self, device: str) -> None:
        for key in [k for k in self._pending if k[0] == device]:
            del self._pending[key]

    @property
    def open_transfers(self) -> int:
        return len(self._pending)


def control_frame(type_: str, *, run: str, device: str, round_: int, **data: Any) -> bytes:
    """A small JSON-only frame (register, status, heartbeat, round, shutdown, ack)."""
    if type_ not in CONTROL_TYPES:
        raise ValueError(f"unknown control type {type_!r}")
    return encode_frame({"type": type_, "run": run, "device": device, "round": round_, "data": data})
