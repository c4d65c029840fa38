"""Transfers cut into frames and put back together: crc32 per chunk, sha256 per transfer, idempotent."""
from __future__ import annotations

import bisect
import hashlib
import re
import time
import uuid
import zlib
from collections import OrderedDict
from dataclasses import dataclass, field

from edgefl_core.reliable import MAX_MISSING_RANGES, progress_data
from edgefl_core.wire import CHUNK, DEFAULT_CHUNK_BYTES, DEFAULT_MAX_TRANSFER_BYTES, ProtocolError, encode_frame


_TRANSFER_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


def new_transfer_id() -> str:
    return uuid.uuid4().hex


def transfer_chunks(blob: bytes, *, run: str, device: str, round_: int, meta: dict, max_chunk: int = DEFAULT_CHUNK_BYTES,
                    transfer_id: str | None = None) -> list[tuple[dict, bytes]]:
    """Cut a packed transfer into ``(header, body)`` chunks of at most ``max_chunk`` body bytes, each with its
    crc32; every header names the transfer's size, chunk count and sha256, the first also carries ``meta``."""
    if max_chunk <= 0:
        raise ValueError("max_chunk must be > 0")
    transfer_id = transfer_id or new_transfer_id()
    digest = hashlib.sha256(blob).hexdigest()
    count = max(1, -(-len(blob) // max_chunk))
    chunks = []
    for index in range(count):
        body = blob[index * max_chunk:(index + 1) * max_chunk]
        header = {"type": CHUNK, "run": run, "device": device, "round": round_, "transfer": transfer_id,
                  "index": index, "count": count, "size": len(blob), "crc32": zlib.crc32(body), "sha256": digest}
        if index == 0:
            header["meta"] = meta
        chunks.append((header, body))
    return chunks


def chunk_transfer(blob: bytes, **kwargs) -> list[bytes]:
    """:func:`transfer_chunks` as encoded frames (for transfers sent without acknowledgement: the downlink)."""
    return [encode_frame(header, body) for header, body in transfer_chunks(blob, **kwargs)]


@dataclass
class CompletedTransfer:
    device: str
    round: int
    transfer: str
    meta: dict
    blob: bytes
    wire_bytes: int
    chunks: int
    sha256: str = ""     # of the blob as sent, verified by the reassembler (hex)
    packed: str = "zstd"  # ``blob`` as sent (zstd over safetensors), or "raw": decompressed by an ingest worker


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
    held_bytes: int = 0    # body bytes held: never more than ``size``
    charged: int = 0       # what counts against the device's quota: at least CHUNK_CHARGE per chunk
    spans: list = field(default_factory=list)  # sorted, disjoint [first, last] runs of held indices


CHUNK_CHARGE = 1024  # a chunk costs the quota at least this much: bookkeeping, not only its body, is memory


def _add_span(spans: list, index: int) -> None:
    """Insert ``index`` into sorted disjoint ``[first, last]`` runs, merging neighbours (O(log n) + a list insert)."""
    at = bisect.bisect_left(spans, [index, index])
    joins_left = at > 0 and spans[at - 1][1] == index - 1
    joins_right = at < len(spans) and spans[at][0] == index + 1
    if joins_left and joins_right:
        spans[at - 1][1] = spans[at][1]
        del spans[at]
    elif joins_left:
        spans[at - 1][1] = index
    elif joins_right:
        spans[at][0] = index
    else:
        spans.insert(at, [index, index])


def _gaps(spans: list, limit: int) -> tuple[list[list[int]], bool]:
    """The missing ``[first, last]`` ranges below the highest held index (at most ``limit``), and whether cut."""
    gaps, previous_end = [], -1
    for first, last in spans:
        if first > previous_end + 1:
            if len(gaps) >= limit:
                return gaps, True
            gaps.append([previous_end + 1, first - 1])
        previous_end = last
    return gaps, False


class Reassembler:
    """Collect chunks into transfers; idempotent on (device, transfer id).

    Duplicates (QoS 1 redelivery, retries) and out-of-order chunks are fine; a chunk whose crc32
    or a transfer whose sha256 does not match is rejected. Memory is bounded as bytes arrive: a transfer
    holds at most its announced ``size`` (at most ``max_transfer_bytes``), a device at most
    ``max_pending_per_device`` open transfers and ``max_pending_bytes_per_device`` bytes in them, the
    whole at most ``max_pending`` transfers. Incomplete transfers expire after ``timeout_s``. A finished
    transfer is remembered with its verdict (:meth:`settle`) so late duplicates are dropped and a
    sender asking again learns the answer (:meth:`progress`).

    Wire accounting (what the caller passes as ``wire_bytes``): a completed transfer carries the wire bytes
    of the first copy of each of its chunks (``CompletedTransfer.wire_bytes``); :attr:`duplicates` counts
    the copies dropped; the wire bytes held by a transfer dropped incomplete (expired, forgotten, failing
    its sha256) are added to :attr:`dropped_wire` (per device) until :meth:`take_dropped` collects them.
    """

    def __init__(self, max_transfer_bytes: int = DEFAULT_MAX_TRANSFER_BYTES, timeout_s: float = 300.0,
                 max_pending: int = 1024, remember: int = 65536, max_chunk: int = 16 << 20,
                 max_pending_per_device: int = 8, max_pending_bytes_per_device: int | None = None):
        self.max_transfer_bytes = max_transfer_bytes
        self.timeout_s = timeout_s
        self.max_pending = max_pending
        self.max_pending_per_device = max_pending_per_device  # one device cannot use up the shared budget
        self.max_pending_bytes_per_device = max_pending_bytes_per_device or max_transfer_bytes
        self.max_chunk = max_chunk
        self._pending: dict[tuple[str, str], _Pending] = {}
        self._done: OrderedDict[tuple[str, str], tuple[bool, str | None] | None] = OrderedDict()
        self._remember = remember
        self.duplicates = 0
        self.dropped_wire: dict[str, int] = {}  # device -> wire bytes of transfers dropped incomplete

    def held_bytes(self, device: str) -> int:
        """What ``device``'s open transfers count against its quota (bodies, at least CHUNK_CHARGE a chunk)."""
        return sum(p.charged for (d, _), p in self._pending.items() if d == device)

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
        # every chunk is checked, also one of a finished transfer: a copy that is not one is charged, never
        # waved through as a retransmission
        if size < 0 or not (0 <= index < count) or count > size + 1:
            raise ProtocolError("bad_header", f"chunk {str(index)[:20]} of {str(count)[:20]} for {str(size)[:20]} bytes")
        if size > self.max_transfer_bytes:
            raise ProtocolError("oversized", f"transfer of {size} bytes > limit {self.max_transfer_bytes}")
        if len(body) > self.max_chunk:
            raise ProtocolError("oversized", f"chunk of {len(body)} bytes > limit {self.max_chunk}")
        if zlib.crc32(body) != crc:
            raise ProtocolError("bad_checksum", f"chunk {index} of transfer {transfer[:8]} fails its crc32")
        if key in self._done:
            if len(body) > size:  # no chunk of this transfer was ever larger than all of it
                raise ProtocolError("bad_header", f"chunk {index} of finished transfer {transfer[:8]} holds "
                                    f"{len(body)} bytes, the transfer {size}")
            self.duplicates += 1
            return None
        pending = self._pending.get(key)
        if pending is not None and (pending.count, pending.size, pending.sha256, pending.round) != (count, size, digest, round_):
            raise ProtocolError("bad_header", f"chunk {index} disagrees with earlier chunks of transfer {transfer[:8]}")
        if pending is not None and index in pending.parts:
            self.duplicates += 1
            return None
        if index == 0 and not isinstance(header.get("meta"), dict):
            raise ProtocolError("bad_header", "first chunk lacks its meta object")
        if not body and size > 0:
            raise ProtocolError("bad_header", f"chunk {index} of transfer {transfer[:8]} is empty")
        held = pending.held_bytes if pending is not None else 0
        if held + len(body) > size:
            raise ProtocolError("oversized", f"transfer {transfer[:8]} would hold {held + len(body)} bytes, it "
                                             f"announced {size}")
        charge = max(len(body), CHUNK_CHARGE)
        mine = self.held_bytes(device)
        if mine + charge > self.max_pending_bytes_per_device:
            raise ProtocolError("over_quota", f"{device} would hold {mine + charge} bytes in open transfers "
                                              f"(limit {self.max_pending_bytes_per_device})")
        if pending is None:
            if len(self._pending) >= self.max_pending:
                raise ProtocolError("too_many_transfers", f"{len(self._pending)} transfers already open")
            open_ = sum(1 for d, _ in self._pending if d == device)
            if open_ >= self.max_pending_per_device:
                raise ProtocolError("too_many_transfers", f"{device} already has {open_} transfers open "
                                                          f"(limit {self.max_pending_per_device})")
            pending = self._pending[key] = _Pending(count, size, digest, round_, now)
        pending.parts[index] = body
        pending.started = now  # expiry counts idle time: a slow, lossy transfer that keeps moving lives
        pending.held_bytes += len(body)
        pending.charged += charge
        _add_span(pending.spans, index)
        pending.wire_bytes += wire_bytes if wire_bytes is not None else len(body)
        if index == 0:
            pending.meta = header["meta"]
        if len(pending.parts) < count:
            return None
        del self._pending[key]
        blob = b"".join(pending.parts[i] for i in range(count))
        if len(blob) != size or hashlib.sha256(blob).hexdigest() != digest:
            self._dropped(device, pending)
            self._remember_done(key, (False, "bad_checksum"))
            raise ProtocolError("bad_checksum", f"transfer {transfer[:8]} from {device} fails its sha256")
        self._remember_done(key, None)
        assert pending.meta is not None
        return CompletedTransfer(device, round_, transfer, pending.meta, blob, pending.wire_bytes, count, pending.sha256)

    def _dropped(self, device: str, pending: _Pending) -> None:
        self.dropped_wire[device] = self.dropped_wire.get(device, 0) + pending.wire_bytes

    def take_dropped(self) -> dict[str, int]:
        """Device -> wire bytes of the transfers dropped incomplete since the last call (then forgotten)."""
        dropped, self.dropped_wire = self.dropped_wire, {}
        return dropped

    def _remember_done(self, key: tuple[str, str], verdict: tuple[bool, str | None] | None) -> None:
        self._done[key] = verdict
        while len(self._done) > self._remember:
            self._done.popitem(last=False)

    def reopen(self, device: str, transfer: str) -> None:
        """Forget a completed transfer that was not judged after all (its judge never saw it whole): a resend of
        it is reassembled afresh instead of being counted as a copy of a finished one."""
        self._done.pop((device, transfer), None)

    def settle(self, device: str, transfer: str, accepted: bool, reason: str | None = None) -> None:
        """Record the verdict on a completed transfer (what :meth:`progress` answers a sender asking again)."""
        if (device, transfer) in self._done:
            self._done[(device, transfer)] = (accepted, reason)

    def progress(self, device: str, transfer: str, seq: int | None = None) -> dict | None:
        """The ``data`` of the ACK that answers a sender asking about ``transfer`` (see
        :mod:`edgefl_core.reliable`): the verdict once complete and judged, else which chunks are held.
        None while a completed transfer is still being judged."""
        key = (device, transfer)
        if key in self._done:
            verdict = self._done[key]
            if verdict is None:
                return None
            return {"transfer": transfer, "final": True, "accepted": verdict[0], "reason": verdict[1]}
        pending = self._pending.get(key)
        if pending is None:  # nothing held (all lost, expired, or this runtime restarted)
            return progress_data(transfer, high=-1, held=(), seq=seq)
        gaps, more = _gaps(pending.spans, MAX_MISSING_RANGES)
        return {"transfer": transfer, "final": False, "high": pending.spans[-1][1], "missing": gaps, "more": more,
                "seq": seq}

    def answer(self, device: str, header: dict) -> dict | None:
        """The ACK ``data`` for a chunk whose header asks for progress (``ack``: the sender's sequence number),
        else None (no request, a malformed one, or a transfer still being judged)."""
        seq, transfer = header.get("ack"), header.get("transfer")
        if type(seq) is int and isinstance(transfer, str) and len(transfer) <= 64:
            return self.progress(device, transfer, seq)
        return None

    def forget(self, device: str, idle_s: float = 0.0, now: float | None = None) -> int:
        """Drop ``device``'s open transfers (it restarted: their senders are gone) that have been idle at least
        ``idle_s`` seconds (0: all); returns how many."""
        now = time.monotonic() if now is None else now
        keys = [k for k, p in self._pending.items() if k[0] == device and now - p.started >= idle_s]
        for k in keys:
            self._dropped(device, self._pending.pop(k))
        return len(keys)

    def expire(self, now: float | None = None) -> list[tuple[str, str]]:
        """Drop transfers idle longer than ``timeout_s``; returns their (device, transfer) keys."""
        now = time.monotonic() if now is None else now
        stale = [k for k, p in self._pending.items() if now - p.started > self.timeout_s]
        for k in stale:
            self._dropped(k[0], self._pending.pop(k))
        return stale

    @property
    def open_transfers(self) -> int:
        return len(self._pending)
