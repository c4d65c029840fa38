"""A device's uplink: transfers sent until the runtime has judged them (:mod:`edgefl_core.reliable`).

Torch-free on purpose: what goes up is packed bytes, so any edge engine can send through it.
"""
from __future__ import annotations

import logging
import time
from typing import Callable

from edgefl_core.chunking import transfer_chunks
from edgefl_core.reliable import Progress, TransferSender
from edgefl_core.transport import Transport
from edgefl_core.wire import MAX_INGEST_SHARDS, Topics, ingest_shard

logger = logging.getLogger("edgefl.agent")


class Uplink:
    """Sends one transfer at a time on ``topics.up(device)`` (or on its ingest worker's shard of it, when the run
    has workers: :meth:`use_shards`); answers from the runtime reach the transfer in flight through
    :meth:`on_progress`. ``upload`` is the device's :class:`~edge_sdk.config.UploadConfig`."""

    def __init__(self, transport: Transport, topics: Topics, device: str, upload):
        self.transport, self.topics, self.device, self.upload = transport, topics, device, upload
        self.sender: TransferSender | None = None
        self.bytes_up = 0              # bytes published (re-sent chunks included)
        self.bytes_resent = 0          # of those, the sends of a chunk after its first
        self.last_transfer_bytes = 0   # the last transfer's chunk bodies, each once
        self.last_transfer_wire = 0    # the last transfer's frames, each chunk's first send (what the runtime counts)
        self.shards = 0                # the run's ingest workers (0: chunks go to the runtime itself)

    def use_shards(self, shards) -> None:
        """The run's ``ingest_shards`` (from its HELLO / ROUND frames): chunks go to worker :func:`~edgefl_core.wire.ingest_shard` on
        ``topics.up(device, shard)``. Anything but an integer in [1, MAX_INGEST_SHARDS] means no workers."""
        shards = shards if type(shards) is int and 1 <= shards <= MAX_INGEST_SHARDS else 0
        if shards != self.shards:
            logger.info("%s: uploads go to ingest shard %s", self.device,
                        f"{ingest_shard(self.topics.run, self.device, shards)} of {shards}" if shards else "none (the runtime)")
        self.shards = shards

    @property
    def topic(self) -> str:
        return self.topics.up(self.device, ingest_shard(self.topics.run, self.device, self.shards) if self.shards else None)

    def on_progress(self, progress: Progress) -> None:
        if self.sender is not None:
            self.sender.on_progress(progress, time.monotonic())

    def send(self, blob: bytes, round_: int, meta: dict, what: str, *, poll: Callable[[float], None],
             abort: Callable[[], bool]) -> Progress | None:
        """Chunk ``blob`` and send it until the runtime's verdict: chunks it does not acknowledge are sent again,
        so a broker that drops messages costs time, never data. Returns the verdict (a rejection is logged and
        ends the transfer: re-sending would not change it), or None once ``abort()`` is true.
        ``poll(timeout)`` handles incoming messages (the runtime's answers arrive through it)."""
        chunks = transfer_chunks(blob, run=self.topics.run, device=self.device, round_=round_, meta=meta,
                                 max_chunk=self.upload.chunk_bytes)
        sender = TransferSender(chunks, self._paced_publisher(), window=self.upload.window_chunks,
                                max_window=self.upload.max_window_chunks)
        logger.info("%s: uploading round %d %s: %d chunks, %.2f MB", self.device, round_, what, len(chunks),
                    len(blob) / 1e6)
        self.sender = sender
        try:
            verdict = sender.run(poll, connected=lambda: self.transport.connected, abort=abort)
        finally:
            self.sender = None
        self.last_transfer_bytes = sum(len(body) for _, body in chunks)
        self.last_transfer_wire = sender.first_bytes
        self.bytes_resent += sender.resent_bytes
        if verdict is not None and not verdict.accepted:
            logger.error("%s: the runtime rejected round %d %s: %s", self.device, round_, what, verdict.reason)
        elif verdict is not None and "raw_fp32_bytes" in meta:
            logger.info("%s: round %d %s done: %d bytes on the wire (%.1fx smaller than fp32)", self.device, round_,
                        what, self.last_transfer_wire, meta["raw_fp32_bytes"] / max(self.last_transfer_bytes, 1))
        if sender.resends or sender.timeouts:  # the broker dropped messages (queue limits?) or the runtime was slow
            logger.warning("%s: %s of %d chunks needed %d re-sent chunks and %d timeouts", self.device, what,
                           len(chunks), sender.resends, sender.timeouts)
        return verdict

    def _paced_publisher(self) -> Callable[[bytes], None]:
        """``publish(frame)``, at most ``upload.max_bytes_per_s`` on average when a cap is set."""
        topic, cap, start, sent = self.topic, self.upload.max_bytes_per_s, time.monotonic(), 0

        def publish(frame: bytes) -> None:
            nonlocal sent
            self.transport.publish(topic, frame)
            sent += len(frame)
            self.bytes_up += len(frame)
            if cap:
                ahead = sent / cap - (time.monotonic() - start)
                if ahead > 0:
                    time.sleep(ahead)
        return publish
