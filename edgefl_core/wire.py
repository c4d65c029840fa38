"""The edgefl wire protocol (v1): topics, the frame envelope and control frames. See ``docs/PROTOCOL.md``.

Frame = ``b"EFL1"`` | u32 header length (big-endian) | UTF-8 JSON header | body bytes.
The JSON header always carries ``v`` (protocol version), ``type``, ``run``, ``device`` and
``round``. Tensors travel only as safetensors blobs (:mod:`edgefl_core.codecs`), cut into chunks
(:mod:`edgefl_core.chunking`); nothing is ever unpickled.
"""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass
from typing import Any

PROTOCOL_VERSION = 1
MAGIC = b"EFL1"
MAX_HEADER_BYTES = 64 * 1024
MAX_HEADER_DEPTH = 8                      # header -> data/meta -> metrics/recipe -> edge -> kwargs: 5 in use
MAX_ROUND = 1 << 31
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
# inside the cloud (sharded ingest, docs/DEPLOYMENT.md): an ingest worker -> the coordinator, and back
INGESTED = "ingested"          # worker -> coordinator: a transfer it reassembled and verified (body: the blob)
INGEST_EVENT = "ingest_event"  # worker -> coordinator: bytes to charge to a device (re-sent, rejected)
VERDICT = "verdict"            # coordinator -> worker: its judgement of a forwarded transfer
MAX_INGEST_SHARDS = 1024

# transfer kinds (what a completed chunk sequence decodes to)
KIND_UPLOAD = "upload"
KIND_SOFT_LABELS = "soft_labels"
KIND_MODEL = "model"                # cloud -> device: the global model of a FedAvg round
KIND_MODEL_UPDATE = "model_update"  # device -> cloud: locally trained weights
KIND_EXTRACTOR = "extractor"        # cloud -> device: averaged FedGKT feature extractor
KIND_EDGE_PROGRAM = "edge_program"  # cloud -> device: compiled ONNX graphs (engine onnxruntime), announced by digest
EXTRACTOR_PREFIX = "extractor."     # upload arrays carrying the device's extractor (when averaging)


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

    def up(self, device: str, shard: int | None = None) -> str:
        """A device's uplink; ``shard``: the ingest worker its chunks go to (:func:`ingest_shard`), None for the
        coordinator (registrations always, and chunks when the run has no ingest workers)."""
        return f"{self.base}/dev/{device}/up" if shard is None else f"{self.base}/dev/{device}/up/{shard}"

    def shard_up(self, shard: int) -> str:
        """What ingest worker ``shard`` subscribes to: the chunks of every device in its shard."""
        return f"{self.base}/dev/+/up/{shard}"

    def ingest(self, shard: int) -> str:
        """Worker ``shard`` -> the coordinator (:data:`INGESTED`, :data:`INGEST_EVENT`). Outside ``dev/``: no
        device credential may publish here (``broker_files.py``)."""
        return f"{self.base}/ingest/{shard}"

    @property
    def all_ingest(self) -> str:
        return f"{self.base}/ingest/+"

    def ingest_status(self, shard: int) -> str:
        """Worker ``shard``'s presence (retained ``online``; its Last Will says ``offline``)."""
        return f"{self.base}/ingest/{shard}/status"

    @property
    def all_ingest_status(self) -> str:
        return f"{self.base}/ingest/+/status"

    def verdicts(self, shard: int) -> str:
        """The coordinator -> worker ``shard``: :data:`VERDICT` frames."""
        return f"{self.base}/ingest/{shard}/verdict"

    def ingest_shard_of(self, topic: str) -> int | None:
        """The shard of a worker -> coordinator topic (:meth:`ingest`), else None."""
        prefix = f"{self.base}/ingest/"
        rest = topic[len(prefix):] if topic.startswith(prefix) else ""
        return int(rest) if rest.isdigit() and len(rest) <= 4 else None

    def sharded_device_of(self, topic: str) -> tuple[str, int] | None:
        """(device, shard) of a sharded uplink topic (:meth:`up` with a shard), else None."""
        parts, base = topic.split("/"), self.base.split("/")
        if len(parts) == len(base) + 4 and parts[:len(base)] == base and parts[len(base)] == "dev" \
                and parts[-2] == "up" and parts[-1].isdigit() and len(parts[-1]) <= 4:
            return parts[len(base) + 1], int(parts[-1])
        return None

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


def ingest_shard(run: str, device: str, shards: int) -> int:
    """The ingest worker of ``device`` among ``shards`` in run ``run``: the first 8 bytes of
    sha256("<run>/<device>") (UTF-8), big-endian, mod ``shards``. Stable across processes and machines, so every
    chunk of a transfer reaches one worker (none is split between two); well mixed, so ids that differ in one
    character (dev0, dev1) spread (crc32's low bits do not), and the run in the key gives each run its own spread."""
    if shards <= 1:
        return 0
    return int.from_bytes(hashlib.sha256(f"{run}/{device}".encode()).digest()[:8], "big") % shards


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


def _depth(value, limit: int = 64) -> int:
    """Nesting depth of a parsed JSON value, iteratively (never recurses); stops counting past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        deepest = max(deepest, level)
        if level > limit:
            break
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, level + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON (RFC 8259 has no NaN or Infinity)")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} overflows a double")
    return value


def _read_header(payload: bytes) -> tuple[object, int]:
    """A frame's header, JSON-decoded (strict RFC 8259), and its length; raises ProtocolError."""
    if len(payload) < 8 or payload[:4] != MAGIC:
        raise ProtocolError("bad_magic", f"frame starts with {payload[:4]!r}")
    (header_len,) = struct.unpack(">I", payload[4:8])
    if header_len > MAX_HEADER_BYTES or 8 + header_len > len(payload):
        raise ProtocolError("truncated", f"header length {header_len} with {len(payload)} bytes in frame")
    try:
        header = json.loads(payload[8:8 + header_len], parse_constant=_no_constant, parse_float=_finite_float)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:  # JSONDecodeError, > 4300-digit ints, nesting
        raise ProtocolError("bad_header", f"{type(e).__name__}: {str(e)[:200]}") from None
    return header, header_len


def frame_device(payload: bytes) -> str | None:
    """The ``device`` a frame's header names, read without checking the rest (None: no such header). For
    deciding whose bound a queued message counts toward before it is handled; :func:`decode_frame` judges it."""
    try:
        header, _ = _read_header(payload)
    except ProtocolError:
        return None
    device = header.get("device") if isinstance(header, dict) else None
    return device if isinstance(device, str) else None


def decode_frame(payload: bytes, max_body: int | None = None) -> tuple[dict, bytes]:
    """Parse and sanity-check a frame; every failure is a :class:`ProtocolError` with a reason."""
    header, header_len = _read_header(payload)
    if not isinstance(header, dict):
        raise ProtocolError("bad_header", "header is not an object")
    depth = _depth(header)
    if depth > MAX_HEADER_DEPTH:
        raise ProtocolError("bad_header", f"header nested {depth} levels deep (limit {MAX_HEADER_DEPTH})")
    if type(header.get("v")) is not int or header.get("v") != PROTOCOL_VERSION:
        raise ProtocolError("bad_version", f"protocol version {header.get('v')!r}, this side speaks {PROTOCOL_VERSION}")
    for key, typ in (("type", str), ("run", str), ("device", str), ("round", int)):
        if not isinstance(header.get(key), typ) or isinstance(header.get(key), bool):
            raise ProtocolError("bad_header", f"field {key!r} missing or not {typ.__name__}")
    if not -1 <= header["round"] < MAX_ROUND:
        raise ProtocolError("bad_header", f"round {str(header['round'])[:40]} outside [-1, {MAX_ROUND})")
    body = payload[8 + header_len:]
    if max_body is not None and len(body) > max_body:
        raise ProtocolError("oversized", f"{len(body)} body bytes > limit {max_body}")
    return header, body


def control_frame(type_: str, *, run: str, device: str, round_: int, **data: Any) -> bytes:
    """A small JSON-only frame (register, status, heartbeat, round, shutdown, ack)."""
    if type_ not in CONTROL_TYPES:
        raise ValueError(f"unknown control type {type_!r}")
    return encode_frame({"type": type_, "run": run, "device": device, "round": round_, "data": data})


__all__ = ['PROTOCOL_VERSION', 'MAGIC', 'MAX_HEADER_BYTES', 'MAX_HEADER_DEPTH', 'MAX_ROUND', 'DEFAULT_CHUNK_BYTES', 'DEFAULT_MAX_TRANSFER_BYTES', 'REGISTER', 'STATUS', 'HEARTBEAT', 'CHUNK', 'ROUND', 'SHUTDOWN', 'ACK', 'HELLO', 'CONTROL_TYPES', 'INGESTED', 'INGEST_EVENT', 'VERDICT', 'MAX_INGEST_SHARDS', 'ingest_shard', 'KIND_UPLOAD', 'KIND_SOFT_LABELS', 'KIND_MODEL', 'KIND_MODEL_UPDATE', 'KIND_EXTRACTOR', 'KIND_EDGE_PROGRAM', 'EXTRACTOR_PREFIX', 'ProtocolError', 'Topics', 'check_device_id', 'encode_frame', 'frame_device', 'decode_frame', 'control_frame']
