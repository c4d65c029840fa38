"""Transfers cut into frames and put back together: crc32 per chunk, sha256 per transfer, idempotent."""
from __future__ import annotations

import hashlib
import re
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

from edgefl_core.wire import CHUNK, DEFAULT_CHUNK_BYTES, DEFAULT_MAX_TRANSFER_BYTES, ProtocolError, encode_frame


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
                 max_pending: int = 1024, remember: int = 65536, max_chunk: int = 16 << 20,
                 max_pending_per_device: int = 8):
        self.max_transfer_bytes = max_transfer_bytes
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.max_pending_per_device = max_pending_per_device  # one device cannot use up the shared budget
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
            mine = sum(1 for d, _ in self._pending if d == device)
            if mine >= self.max_pending_per_device:
                raise ProtocolError("too_many_transfers", f"{device} already has {mine} transfers open "
                                                          f"(limit {self.max_pending_per_device})")
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

    @property
    def open_transfers(self) -> int:
        return len(self._pending)
