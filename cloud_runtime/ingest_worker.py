"""Sharded ingest: one shard of the uplink reassembled, checksummed and decompressed off the coordinator.

In a run with ``ingest.workers`` = N the run recipe tells devices N, and each publishes its chunks on
``.../dev/<id>/up/<k>`` with k = sha256("<run>/<id>") mod N (:func:`edgefl_core.wire.ingest_shard`; registrations stay on
``.../dev/<id>/up``). Worker k subscribes to shard k alone, so a transfer is never split between two workers
(mosquitto's ``$share`` round-robins single messages, which would split it; brokers with sticky shared
subscriptions are discussed in docs/DEPLOYMENT.md). Per chunk the worker does what the coordinator does
without workers: frame checks, crc32, per-device quotas, reassembly, the transfer's sha256, answers to a
sender's progress requests. A completed transfer is decompressed (at most ``max_decoded_bytes``) and forwarded
to the coordinator as one :data:`~edgefl_core.wire.INGESTED` frame on ``.../ingest/<k>``. The coordinator
judges it exactly as it judges a transfer it reassembled itself (the strategy's checks, ids, rounds), ACKs
the device and sends the worker its :data:`~edgefl_core.wire.VERDICT` (what the worker answers a sender that
asks again). Bytes a worker refuses or sees twice are charged to their device through
:data:`~edgefl_core.wire.INGEST_EVENT` frames, with the reason.

A worker holds no run state and imports no torch. It forwards decompressed only what inflates at most
:data:`MAX_FORWARD_INFLATION` times (a zstd bomb goes on as sent and is refused by the coordinator before
anything is allocated), and every forwarded transfer gets a verdict back: final from the judge, or ``retry``
when the coordinator did not judge it (it never arrived whole, the device was quarantined or unknown), so the
device's resend is reassembled afresh. Killed, it is started again (by ``cloud-runtime serve`` when
it spawned it: :class:`WorkerPool`); its persistent MQTT session hands it the chunks queued meanwhile, and the
chunks it held are asked for again by their senders (:mod:`edgefl_core.reliable`). Nothing accepted lives here.
"""
from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import threading
import time
import uuid

import zstandard

from cloud_runtime.config import RuntimeConfig
from edgefl_core import wire as W
from edgefl_core.chunking import CompletedTransfer, Reassembler
from edgefl_core.codecs import decompress
from edgefl_core.config import ConfigError
from edgefl_core.transport import Transport
from edgefl_core.transport.inbox import Inbox, drain
from edgefl_core.transport.retry import connect_patiently

logger = logging.getLogger("edgefl.ingest")

# a forwarded transfer goes in parts of at most this many bytes, under brokers' message limits (EMQX's
# default max_packet_size is 1 MB; provision writes 8 MiB for mosquitto); one publisher's messages on one topic
# arrive in order (MQTT 5.0, 4.6), so the coordinator appends them without checksums of its own
FORWARD_PART_BYTES = 768 << 10
# a worker decompresses before forwarding only what inflates at most this much (int8 features: ~1.6x): a zstd
# bomb is forwarded as sent, and the coordinator refuses it from its stated size before allocating anything
MAX_FORWARD_INFLATION = 4
MAX_KNOWN_DEVICES = 1_000_000  # devices whose decoded bound a worker keeps (a registered fleet, per shard)
# a device that re-registered: its open transfers idle this long are its old process's, dropped at once (others
# expire after transfer_timeout_s if they are)
FORGET_IDLE_S = 2.0
# chunks dropped unread (quarantined devices, wrong shards) are charged in one event per device and reason this
# often; a quarantine longer than MAX_QUARANTINE_S in a verdict is ignored (a bad frame must not silence a device
# for good); at most MAX_QUARANTINED devices are remembered per worker
BULK_REPORT_S = 1.0
MAX_QUARANTINE_S = 7 * 24 * 3600.0
MAX_QUARANTINED = 100_000
# after a reconnect, how long a worker waits for its shard's retained presence before it says online again
RECLAIM_WAIT_S = 2.0
# a worker publishes its presence again this often; the coordinator calls one silent for 3x as long stale
PRESENCE_EVERY_S = 30.0


class IngestWorker:
    """Worker ``shard`` of ``cfg.ingest.workers`` on ``transport`` (which must use a client id of its own and
    keep its session: chunks queue at the broker while the worker restarts). :meth:`serve` until ``stop``.
    ``instance``: this process's id in its presence (the one its Last Will names; default: a new random one)."""

    def __init__(self, cfg: RuntimeConfig, transport: Transport, shard: int, instance: str | None = None):
        check_shard(cfg, shard)
        self.cfg, self.transport, self.shard = cfg, transport, shard
        self.topics = W.Topics(cfg.run_id)
        self.reassembler = Reassembler(cfg.max_transfer_bytes, cfg.transfer_timeout_s,
                                       max_chunk=cfg.max_chunk_bytes,
                                       max_pending_bytes_per_device=cfg.max_pending_bytes_per_device)
        self.inbox = Inbox(lambda topic, payload: (self.topics.sharded_device_of(topic) or (None,))[0],
                           cfg.max_pending_bytes_per_device)  # per device, as the runtime's
        self.stop = threading.Event()
        self.messages_in = self.forwarded = self.refused = 0
        # device -> what its transfers may decompress to (the coordinator's per-device bound, sent at its
        # registration and with each verdict): only a transfer within it is decompressed here; one of a device
        # whose bound this worker has not heard (yet) goes on as sent, and the coordinator decodes it
        self.decoded_limits: dict[str, int] = {}
        # forwarded transfers without a verdict yet: one still without after transfer_timeout_s was lost on the
        # way (a dropped last part) and is reopened, so the device's resend is reassembled afresh
        self.awaiting: dict[tuple[str, str], float] = {}
        # this process's claim on the shard, in its presence: (generation, instance), ranked. A worker claims one
        # generation above the highest it has seen, so a worker started later outranks the ones before it; a
        # worker that sees an "online" claim ranked above its own stops (brokers that do not say "session taken
        # over", mosquitto 2.0 among them), and one that sees a claim ranked below its own (a broker restored from
        # its saved state) says its own again
        self.instance = instance or new_instance()
        self.generation = 0            # this worker's claim (0: not made yet)
        self.highest_seen = 0          # the highest generation on the presence topic so far
        self.claim_seen = False        # our own "online" came back on the presence topic
        self.superseded_by: str | None = None
        self._presence_said = 0.0      # when this worker last published its presence (monotonic)
        self._was_connected = False
        self._reclaim_at: float | None = None   # say online then, unless the presence topic says otherwise first
        # devices the coordinator quarantined (monotonic deadline): their chunks are dropped unread; they and
        # chunks on a shard not their device's are charged in bulk, (device, reason) -> [messages, bytes], every
        # BULK_REPORT_S, not one event per chunk
        self.quarantined: dict[str, float] = {}
        self.bulk: dict[tuple[str, str], list[int]] = {}
        self._bulk_reported = time.monotonic()

    def enqueue(self, topic: str, payload: bytes) -> None:
        """Transport callback: queue only (runs on the network thread)."""
        self.inbox.put(topic, payload)

    def start(self) -> bool:
        self.transport.subscribe(self.topics.shard_up(self.shard), self.enqueue, retained=False)
        self.transport.subscribe(self.topics.verdicts(self.shard), self.enqueue, retained=False)
        self.transport.subscribe(self.topics.ingest_status(self.shard), self.enqueue)
        if not connect_patiently(self.transport, self.stop, f"ingest worker {self.shard} of run {self.cfg.run_id!r}"):
            return False
        self._was_connected = True
        self._reclaim_at = time.monotonic() + RECLAIM_WAIT_S   # the claim comes once the retained presence is read
        logger.info("ingest worker %d of %d serving run %r (%s)", self.shard, self.cfg.ingest.workers, self.cfg.run_id,
                    self.topics.shard_up(self.shard))
        return True

    def _say_online(self) -> None:
        """Publish this worker's retained ``online`` claim (the first one a generation above the highest seen;
        again after a reconnect: a link that dropped made the broker publish the Last Will in its place)."""
        if not self.generation:
            self.generation = self.highest_seen + 1
        self._reclaim_at = None
        self._presence_said = time.monotonic()
        self.transport.publish(self.topics.ingest_status(self.shard),
                               presence(self.cfg.run_id, self.shard, "online", self.cfg.ingest.workers, self.instance,
                                        self.generation), retain=True)

    def _keep_claim(self, now: float | None = None) -> None:
        """At start and after a reconnect the presence topic's retained message comes (first): :meth:`_on_presence`
        acts on it at once; with none within :data:`RECLAIM_WAIT_S`, this worker claims. Claiming before that
        message is read could overwrite a higher claim. Also renews the claim every :data:`PRESENCE_EVERY_S`."""
        now = time.monotonic() if now is None else now
        connected = self.transport.connected
        if connected and not self._was_connected and self._reclaim_at is None:
            # (a wait already running is not pushed back: two workers of one shard that knock each other off
            # every second would otherwise never stay connected long enough to claim, and never settle it)
            self._reclaim_at = now + RECLAIM_WAIT_S
        self._was_connected = connected
        if not connected or self.taken_over:
            return
        if self._reclaim_at is not None:
            if now >= self._reclaim_at:
                self._say_online()
        elif self.claim_seen and now - self._presence_said >= PRESENCE_EVERY_S:
            self._say_online()   # a fresh presence now and then: a retained one alone may be a dead worker's

    @property
    def taken_over(self) -> bool:
        """Another worker of this shard logged in after this one (its presence claim came later, or the broker
        said "session taken over"): this one stops rather than take the session back."""
        return self.superseded_by is not None or self.transport.taken_over

    def close(self) -> None:
        """Say ``offline`` (retained) and disconnect: a clean stop, which sends no Last Will. A worker another one
        took over says nothing: the presence is the newer worker's."""
        if self.transport.connected and not self.taken_over:
            self.transport.publish(self.topics.ingest_status(self.shard),
                                   presence(self.cfg.run_id, self.shard, "offline", self.cfg.ingest.workers,
                                            self.instance), retain=True)
            self.transport.flush(5)
        self.transport.close()

    def serve(self, parent_pid: int | None = None) -> None:
        """Handle messages until ``stop`` is set, or until process ``parent_pid`` (the coordinator that spawned
        this worker) is gone: a worker outliving it would hold its shard's client id against its successor's."""
        if not self.start():
            return
        while not self.stop.is_set():
            if self.taken_over:  # a second worker for this shard: the newer one serves it
                logger.error("ingest worker %d: another worker of this shard (%s) logged in after this one and took "
                             "over its session: stopping (run exactly one worker per shard)", self.shard,
                             self.superseded_by or "the broker said so")
                return
            self._keep_claim()
            if parent_pid is not None and os.getppid() != parent_pid:
                logger.warning("ingest worker %d: the runtime that started it (pid %d) is gone: stopping", self.shard,
                               parent_pid)
                return
            drain(self.inbox, self.handle, 0.2)
            self.between_drains()

    def between_drains(self) -> None:
        """What the serve loop does after each drain: expire transfers and reopen unjudged forwards as of when
        what was handled arrived (behind a backlog, a transfer's chunks or its verdict may still be queued),
        charge what was dropped."""
        handled_to = self.inbox.handled_up_to()
        for device, transfer in self.reassembler.expire(handled_to):
            self._charge(device, -1, "rejected", 0, "transfer_timeout",
                         f"transfer {transfer[:8]} incomplete after {self.cfg.transfer_timeout_s:.0f}s")
        for device, (messages, wire) in self.inbox.take_dropped().items():
            self._charge(device, -1, "rejected", wire, "inbox_full",
                         f"{messages} messages dropped unread by ingest worker {self.shard}: it held "
                         f"max_pending_bytes_per_device of this device's messages unhandled")
        self._charge_dropped()
        self._charge_bulk()
        self.reopen_unjudged(handled_to)

    def reopen_unjudged(self, now: float | None = None) -> int:
        """Reopen forwarded transfers that got no verdict within ``transfer_timeout_s`` (the coordinator never saw
        them whole); returns how many."""
        now = time.monotonic() if now is None else now
        stale = [key for key, at in self.awaiting.items() if now - at > self.cfg.transfer_timeout_s]
        for device, transfer in stale:
            del self.awaiting[(device, transfer)]
            self.reassembler.reopen(device, transfer)
            logger.warning("%s: transfer %s forwarded %.0f s ago has no verdict: reassembling its resend afresh",
                           device, transfer[:8], self.cfg.transfer_timeout_s)
        return len(stale)

    # -- messages -----------------------------------------------------------------------------------

    def handle(self, topic: str, payload: bytes) -> None:
        """One message; never raises. What is refused is charged to the topic's (authenticated) device."""
        self.messages_in += 1
        if topic == self.topics.verdicts(self.shard):
            self._on_verdict(payload)
            return
        if topic == self.topics.ingest_status(self.shard):
            self._on_presence(payload)
            return
        where = self.topics.sharded_device_of(topic)
        if where is None or not payload:  # not a chunk topic of this run (we subscribe to nothing else)
            return
        device, header = where[0], None
        if device in self.quarantined and self._still_quarantined(device):
            self._add_bulk(device, "quarantined", len(payload))
            return
        if where[1] != self.shard or W.ingest_shard(self.cfg.run_id, device, self.cfg.ingest.workers) != self.shard:
            # chunks sent before the device learnt a new worker count (queued for the old shard while the workers
            # restarted): charged, in bulk, and not an offence; its sender re-sends them on its shard
            self._add_bulk(device, "wrong_shard", len(payload))
            return
        try:
            header, body = W.decode_frame(payload, max_body=self.cfg.max_chunk_bytes)
            if header["run"] != self.cfg.run_id:
                raise W.ProtocolError("wrong_run", f"run {header['run'][:40]!r}")
            if header["device"] != device:
                raise W.ProtocolError("spoofed_device", f"{header['device'][:40]!r} published on {topic}")
            if header["type"] != W.CHUNK:
                raise W.ProtocolError("bad_type", f"{header['type'][:40]!r} on a chunk topic")
            duplicates = self.reassembler.duplicates
            done = self.reassembler.add(header, body, len(payload))
        except W.ProtocolError as e:
            self.refused += 1
            dropped = self.reassembler.take_dropped()  # a transfer failing its sha256: its held bytes, this chunk's
            self._charge(device, header["round"] if header else -1, "rejected",
                         0 if dropped else len(payload), e.reason, str(e))
            for owner, held in dropped.items():
                self._charge(owner, -1, "rejected", held)
            if header is not None:
                self._answer(device, header)
            return
        except Exception as e:  # a bug costs one message, never the worker
            logger.exception("internal error handling a chunk from %s", device)
            self._charge(device, -1, "rejected", len(payload), "internal_error", f"{type(e).__name__}: {e}")
            return
        try:
            if self.reassembler.duplicates > duplicates:
                self._charge(device, header["round"], "resent", len(payload))
            if done is None:
                self._answer(device, header)
            else:
                self._forward(done)
        except W.ProtocolError as e:  # the transfer cannot be forwarded as it is (a header that would not fit)
            self._refuse(done, e.reason, str(e))
        except Exception as e:  # a bug costs one transfer, never the worker
            logger.exception("internal error forwarding a transfer of %s", device)
            self._refuse(done, "internal_error", f"{type(e).__name__}: {e}")

    def _forward(self, done: CompletedTransfer) -> None:
        """Hand a verified transfer to the coordinator in parts of :data:`FORWARD_PART_BYTES`, decompressed when
        it decompresses within its device's bound (:attr:`decoded_limits`) and at most
        :data:`MAX_FORWARD_INFLATION` times its size; else as sent: the coordinator's own decoding then judges it,
        with the reason, like any other, and holds no more than the device sent. The first part carries the
        transfer's meta and accounting."""
        blob, packed = done.blob, "zstd"
        try:
            stated = zstandard.frame_content_size(done.blob)
        except zstandard.ZstdError:
            stated = -1
        limit = min(self.cfg.max_decoded_bytes, MAX_FORWARD_INFLATION * len(done.blob),
                    self.decoded_limits.get(done.device, -1))
        if 0 <= stated <= limit:
            try:
                blob, packed = decompress(done.blob, self.cfg.max_decoded_bytes), "raw"
            except W.ProtocolError:
                pass
        view, topic = memoryview(blob), self.topics.ingest(self.shard)
        parts = max(1, -(-len(blob) // FORWARD_PART_BYTES))
        for part in range(parts):
            header = {"type": W.INGESTED, "run": self.cfg.run_id, "device": done.device, "round": done.round,
                      "transfer": done.transfer, "part": part, "parts": parts, "size": len(blob),
                      "workers": self.cfg.ingest.workers}
            if part == 0:
                header.update(meta=done.meta, wire_bytes=done.wire_bytes, chunks=done.chunks, sha256=done.sha256,
                              packed=packed)
            body = view[part * FORWARD_PART_BYTES:(part + 1) * FORWARD_PART_BYTES]  # framed without a copy of its own
            self.transport.publish(topic, W.encode_frame(header, body))
        self.forwarded += 1
        self.awaiting[(done.device, done.transfer)] = time.monotonic()
        logger.debug("%s: transfer %s of round %d forwarded (%.2f MB, %s)", done.device, done.transfer[:8],
                     done.round, len(blob) / 1e6, packed)

    def _refuse(self, done: CompletedTransfer | None, reason: str, detail: str) -> None:
        """A completed transfer this worker cannot forward: its verdict is the worker's (ACK to the device, what
        a sender asking again is told), its bytes and the reason charged to the device."""
        if done is None:
            return
        self.refused += 1
        self.reassembler.settle(done.device, done.transfer, False, reason)
        self.transport.publish(self.topics.down(done.device), W.control_frame(
            W.ACK, run=self.cfg.run_id, device=done.device, round_=done.round, transfer=done.transfer, final=True,
            accepted=False, reason=reason))
        self._charge(done.device, done.round, "rejected", done.wire_bytes, reason, detail)

    def _on_presence(self, payload: bytes) -> None:
        """This shard's presence (the retained one at start and after each reconnect, and live ones): our own
        claim coming back; our own Last Will (a link that dropped: claim again now); another worker's ``online``
        claim ranked above ours, or any before we claimed: a newer worker (stop) or an older one (claim above it
        now); another's claim ranked below ours, or a claim-less frame: an older worker's, perhaps handed out again
        by a broker restored from its saved state (claim again now, if we are waiting to); another's ``offline``
        (a worker that died): nothing."""
        try:
            data = W.decode_frame(payload, max_body=0)[0].get("data", {})
        except W.ProtocolError:
            return
        if not isinstance(data, dict):
            return
        instance, generation = str(data.get("instance"))[:64], data.get("generation")
        generation = generation if type(generation) is int and 0 < generation < 2**31 else 0
        self.highest_seen = max(self.highest_seen, generation)
        online = data.get("state") == "online"
        if instance == self.instance:
            if online:
                self.claim_seen = True
                self._reclaim_at = None   # the retained claim is ours: nothing to say again
            elif self._reclaim_at is not None:  # our own Last Will: we are back
                self._reclaim_at = time.monotonic()
            return
        if not online:
            return
        if not self.generation:  # not claimed yet: whoever this is came before us, so we claim above it
            if self._reclaim_at is not None:
                self._reclaim_at = time.monotonic()
        elif (generation, instance) > (self.generation, self.instance):
            if self.superseded_by is None:
                self._reclaim_at = None
                self.superseded_by = f"pid {str(data.get('pid'))[:12]} on {str(data.get('host'))[:64]} (claim " \
                                     f"{generation} above this one's {self.generation})"
        elif self.transport.connected:  # a claim below ours is the retained one: ours must be
            self._reclaim_at = time.monotonic()

    def _on_verdict(self, payload: bytes) -> None:
        """The coordinator's verdict on a forwarded transfer, or ``forget``: the device re-registered, its open
        transfers are gone with its old process (their bytes are charged as rejected)."""
        try:
            header, _ = W.decode_frame(payload, max_body=0)
            device, transfer = header["device"], header.get("transfer")
            if header["type"] != W.VERDICT or header["run"] != self.cfg.run_id:
                return
            if isinstance(transfer, str):
                self.awaiting.pop((device, transfer), None)
            left = header.get("quarantined_for_s")
            if type(left) in (int, float) and 0 < left <= MAX_QUARANTINE_S and isinstance(device, str):
                self._quarantine(device, float(left))
            elif left == 0 and type(left) is int and self.quarantined.pop(device, None) is not None:
                logger.info("%s is no longer quarantined: its chunks are read again", device)
            limit = header.get("decoded_limit")
            if type(limit) is int and 0 <= limit <= self.cfg.max_decoded_bytes and isinstance(device, str) \
                    and (device in self.decoded_limits or len(self.decoded_limits) < MAX_KNOWN_DEVICES):
                self.decoded_limits[device] = limit
            if header.get("forget"):  # only transfers idle for a while: the new process may already be
                # sending (this verdict races its first chunks), the old one stopped when it died
                self.reassembler.forget(device, idle_s=FORGET_IDLE_S)
                self._charge_dropped()
            elif header.get("retry") and isinstance(transfer, str):  # not judged: a resend is reassembled anew
                self.reassembler.reopen(device, transfer)
            elif isinstance(transfer, str):
                self.reassembler.settle(device, transfer, header.get("accepted") is True, header.get("reason"))
        except W.ProtocolError as e:
            logger.warning("ignored a malformed verdict on %s: %s", self.topics.verdicts(self.shard), e)

    def _quarantine(self, device: str, seconds: float) -> None:
        """The coordinator quarantined ``device`` for ``seconds`` more: drop its chunks unread until then, and what
        it had open here (charged as rejected, as the coordinator would)."""
        if len(self.quarantined) >= MAX_QUARANTINED and device not in self.quarantined:
            self.quarantined = {d: t for d, t in self.quarantined.items() if t > time.monotonic()}
            if len(self.quarantined) >= MAX_QUARANTINED:
                return  # more quarantined devices than one shard should ever have: judge their chunks as usual
        self.quarantined[device] = time.monotonic() + seconds
        self.reassembler.forget(device, idle_s=0.0)
        self._charge_dropped()
        logger.info("%s is quarantined for %.0f s: its chunks are dropped unread until then", device, seconds)

    def _still_quarantined(self, device: str) -> bool:
        if time.monotonic() < self.quarantined[device]:
            return True
        del self.quarantined[device]
        return False

    def _add_bulk(self, device: str, reason: str, wire: int) -> None:
        self.refused += 1
        if len(self.bulk) >= MAX_QUARANTINED:
            self._charge_bulk(force=True)
        counts = self.bulk.setdefault((device, reason), [0, 0])
        counts[0] += 1
        counts[1] += wire

    def _charge_bulk(self, force: bool = False) -> None:
        """Charge the chunks dropped unread since the last report (a quarantined device's, chunks on a shard not
        their device's): one event per device and reason."""
        if not self.bulk or not force and time.monotonic() - self._bulk_reported < BULK_REPORT_S:
            return
        self._bulk_reported = time.monotonic()
        dropped, self.bulk = self.bulk, {}
        for (device, reason), (messages, wire) in dropped.items():
            what = "while quarantined" if reason == "quarantined" else f"on shard topics not its own (its shard of " \
                f"{self.cfg.ingest.workers} is {W.ingest_shard(self.cfg.run_id, device, self.cfg.ingest.workers)})"
            self._charge(device, -1, "rejected", wire, reason,
                         f"{messages} chunks dropped unread by ingest worker {self.shard} {what}")

    def _answer(self, device: str, header: dict) -> None:
        """Reply to a chunk that asks for progress (``ack``: the sender's sequence number), as the coordinator
        does: QoS 0 on the device's downlink."""
        data = self.reassembler.answer(device, header)
        if data is not None:
            self.transport.publish(self.topics.down(device), W.control_frame(
                W.ACK, run=self.cfg.run_id, device=device, round_=header["round"], **data), qos=0)

    def _charge(self, device: str, round_: int, kind: str, wire: int, reason: str | None = None,
                detail: str = "") -> None:
        """Tell the coordinator to charge ``wire`` bytes of ``kind`` (and a rejection with ``reason``) to ``device``."""
        if not wire and reason is None:
            return
        header = {"type": W.INGEST_EVENT, "run": self.cfg.run_id, "device": device, "round": round_,
                  "kind": kind, "wire": wire, "reason": reason, "detail": detail[:500],
                  "workers": self.cfg.ingest.workers}
        self.transport.publish(self.topics.ingest(self.shard), W.encode_frame(header))

    def _charge_dropped(self) -> None:
        for owner, held in self.reassembler.take_dropped().items():
            self._charge(owner, -1, "rejected", held)


def check_shard(cfg: RuntimeConfig, shard: int) -> None:
    """Raises ConfigError unless ``shard`` is one of ``cfg``'s ingest shards."""
    if not 0 <= shard < cfg.ingest.workers:
        raise ConfigError(f"--shard {shard}: the config's ingest.workers is {cfg.ingest.workers}, so a shard is "
                          f"in [0, {cfg.ingest.workers - 1}]" if cfg.ingest.workers else
                          "ingest.workers is 0 in this config: the coordinator ingests alone, no worker is used")


def new_instance() -> str:
    """A worker process's random id, named in its presence frames."""
    return uuid.uuid4().hex[:12]


CONFIG_EXIT = 2       # cloud-ingest's exit status on a configuration error (config, broker account, certificate)
TAKEN_OVER_EXIT = 3  # cloud-ingest's exit status when another worker of its shard took over its broker session


def presence(run: str, shard: int, state: str, workers: int, instance: str = "", generation: int = 0) -> bytes:
    """Worker ``shard``'s retained presence frame (``online`` / ``offline``; the latter also as its Last Will).
    ``instance``: the worker process's random id; ``generation``: its claim's rank (``IngestWorker``)."""
    return W.control_frame(W.STATUS, run=run, device=f"ingest-{shard}", round_=-1, state=state, pid=os.getpid(),
                           host=socket.gethostname()[:64], workers=workers, instance=instance, generation=generation)


class WorkerPool:
    """The ingest workers of one machine, as child processes (``python -m edgefl_cli.ingest``); one that exits
    while the pool runs is started again after ``restart_delay_s``, unless it stopped on a configuration error
    (:data:`CONFIG_EXIT`) or another worker of its shard took over its broker session (:data:`TAKEN_OVER_EXIT`):
    that one is started again only when asked to (:meth:`resume`: the coordinator saw its shard without a live
    worker for a while, so the one that took over has gone too). :meth:`close` stops them (SIGTERM, then SIGKILL
    after ``grace_s``)."""

    def __init__(self, config_path: str, overrides: list[str], workers: int, restart_delay_s: float = 1.0,
                 log_level: str = "INFO"):
        self.config_path, self.overrides, self.restart_delay_s = config_path, list(overrides), restart_delay_s
        self.log_level = log_level
        self.procs: dict[int, subprocess.Popen] = {}
        self.restarts = 0
        self.taken_over: set[int] = set()   # shards whose worker another one took over (not restarted on exit)
        self._resume: set[int] = set()      # of those, the ones to start again (asked from another thread)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        for shard in range(workers):
            self._start(shard)
        self._watch = threading.Thread(target=self._watcher, name="ingest-workers", daemon=True)
        self._watch.start()

    def command(self, shard: int) -> list[str]:
        sets = [arg for o in self.overrides for arg in ("--set", o)]
        return [sys.executable, "-m", "edgefl_cli.ingest", "--config", self.config_path, "--shard", str(shard),
                "--log-level", self.log_level, "--parent-pid", str(os.getpid()), *sets]

    def _start(self, shard: int) -> None:
        self.procs[shard] = subprocess.Popen(self.command(shard), stdin=subprocess.DEVNULL)
        logger.info("ingest worker %d started (pid %d)", shard, self.procs[shard].pid)

    def resume(self, shard: int) -> None:
        """Start worker ``shard`` again if another worker of its shard took it over (else nothing): the caller
        saw the shard without a live worker, so that one has gone. Thread-safe; done within a second."""
        with self._lock:
            if shard in self.taken_over:
                self._resume.add(shard)

    def _watcher(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                resumed, self._resume = self._resume, set()
                self.taken_over -= resumed
            for shard in sorted(resumed):
                logger.warning("ingest worker %d: its shard has had no live worker for a while (the one that took "
                               "it over has gone): starting it again", shard)
                self.restarts += 1
                self._start(shard)
            for shard, proc in list(self.procs.items()):
                code = proc.poll()
                if code is None or self._stop.is_set():
                    continue
                if code == CONFIG_EXIT:  # its log names what: starting it again would fail the same way
                    logger.error("ingest worker %d (pid %d) stopped on a configuration error (its log above says "
                                 "which): not starting it again. Fix it and restart the runtime", shard, proc.pid)
                    del self.procs[shard]
                    continue
                if code == TAKEN_OVER_EXIT:  # a worker started elsewhere serves the shard now: fighting it helps no one
                    logger.error("ingest worker %d (pid %d) stopped: another worker of shard %d, started outside this "
                                 "runtime, took over its session. Not starting it again while that one serves the "
                                 "shard (it is, once the shard has had no live worker for a while)", shard, proc.pid,
                                 shard)
                    del self.procs[shard]
                    with self._lock:
                        self.taken_over.add(shard)
                    continue
                logger.warning("ingest worker %d (pid %d) exited with %s: starting it again in %.1f s", shard,
                               proc.pid, code, self.restart_delay_s)
                if self._stop.wait(self.restart_delay_s):
                    return
                self.restarts += 1
                self._start(shard)

    def pids(self) -> dict[int, int]:
        return {shard: proc.pid for shard, proc in self.procs.items()}

    def close(self, grace_s: float = 10.0) -> None:
        self._stop.set()
        self._watch.join(5)
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
