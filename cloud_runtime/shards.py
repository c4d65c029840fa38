"""The coordinator's side of sharded ingest (``ingest_worker.py`` is the workers'): what the ingest workers
forward is put together (:class:`ForwardAssembler`) and judged as if it had been
reassembled here; what they refuse is charged to the device with the reason; verdicts, forgets and
quarantines go to the worker of the device's shard; their presence is tracked, and shards without a live
worker are logged. The runtime routes the ingest topics here (:meth:`Shards.handle`); the judging of a
transfer (:meth:`CloudRuntime._judge`) and a device's registration stay the runtime's.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable

from cloud_runtime.config import RuntimeConfig
from cloud_runtime.ingest import Ingest
from cloud_runtime.ingest_worker import PRESENCE_EVERY_S
from cloud_runtime.registry import DeviceRegistry, Rejected
from edge_sdk import protocol as P
from edge_sdk.messages import MessageError
from edgefl_core.chunking import CompletedTransfer
from edgefl_core.transport import Transport

logger = logging.getLogger("edgefl.runtime")

WORKER_CHECK_S = 30.0   # how often shards without a live ingest worker are looked for (and logged)
STALE_PRESENCE_S = 3 * PRESENCE_EVERY_S   # an "online" presence not renewed this long is stale
REFUSED_REMEMBERED = 1024  # forwards refused from their first part, whose later parts are dropped


class Shards:
    """The ingest workers of one runtime (``cfg.ingest.workers`` > 0). ``judge(device, done, settle, refused)``
    is the runtime's verdict on a completed transfer, ``late(device, what)`` whether a message belongs to an
    earlier runtime session (ignored), ``decoded_limit(device, meta)`` the strategy's bound on what a transfer
    may decompress to, ``count_message()`` counts a forwarded transfer as one message in."""

    def __init__(self, cfg: RuntimeConfig, transport: Transport, topics: P.Topics, registry: DeviceRegistry,
                 ingest: Ingest, judge: Callable, late: Callable[[str, str], bool],
                 decoded_limit: Callable[[str, dict], int], count_message: Callable[[], None]):
        self.cfg, self.transport, self.topics, self.registry, self.ingest = cfg, transport, topics, registry, ingest
        self.judge, self.late, self.decoded_limit, self.count_message = judge, late, decoded_limit, count_message
        self.workers = cfg.ingest.workers
        self.forwarded = 0   # transfers the ingest workers forwarded
        self.forwards = ForwardAssembler(cfg.max_decoded_bytes, lambda device, transfer: self.tell_worker(
            device, transfer=transfer, retry=True), self.check_forward)  # each worker's forward in progress
        self.worker_status: dict[int, dict] = {}  # shard -> its worker's presence (state, since, seen)
        self._misconfigured: set[int] = set()     # shards whose worker runs another config (logged once)
        self._checked = time.monotonic()          # when shards without a live worker were last looked for
        # told the shards that have had no live worker for STALE_PRESENCE_S (the runtime's WorkerPool.resume: a
        # worker it spawned that another took over is started again once that one has gone too)
        self.on_unserved: Callable[[int], None] | None = None

    def subscribe(self, enqueue: Callable[[str, bytes], None]) -> None:
        """What the workers forward (a topic no device credential may publish on) and their retained presence."""
        self.transport.subscribe(self.topics.all_ingest, enqueue, retained=False)
        self.transport.subscribe(self.topics.all_ingest_status, enqueue)  # retained presence, Last Will

    def handle(self, topic: str, payload: bytes) -> bool:
        """A message on an ingest topic, handled (never raises); False: the topic is not one (the runtime
        handles it)."""
        try:
            if (shard := self.topics.ingest_shard_of(topic)) is not None:
                self.on_forward(shard, payload)
                return True
            if topic.startswith(f"{self.topics.base}/ingest/") and topic.endswith("/status"):
                self.on_presence(topic, payload)
                return True
        except Exception:  # a bug costs one forward part, never the service
            logger.exception("internal error handling %s", topic[:200])
            return True
        return False

    def check_presence(self, handled_to: float) -> None:
        """Every :data:`WORKER_CHECK_S`: an ``online`` presence not renewed for :data:`STALE_PRESENCE_S` by
        ``handled_to`` (the ``time.monotonic()`` up to which the runtime has handled what arrived: a renewal
        still queued is not a silence) is ``stale``; shards without a live worker are logged, with the remedy
        (``ingest.spawn``: this runtime starts its workers itself)."""
        now = time.monotonic()
        if now - self._checked <= WORKER_CHECK_S:
            return
        self._checked = now
        for status in self.worker_status.values():  # a presence not renewed: the worker may be gone (a
            if status["state"] == "online" and handled_to - status["seen"] > STALE_PRESENCE_S:  # broker restored
                status.update(state="stale", since=time.time())                          # it from saved state)
        missing = {k: self.worker_status.get(k, {}).get("state", "unknown") for k in range(self.workers)
                   if self.worker_status.get(k, {}).get("state") != "online"}
        for shard in missing:
            if self.on_unserved is not None and \
                    time.time() - self.worker_status.get(shard, {}).get("since", time.time()) > STALE_PRESENCE_S:
                self.on_unserved(shard)
        if missing:
            logger.warning("ingest shards without a live worker: %s (state per shard; stale: no presence for "
                           "%.0f s). Their devices cannot upload. %s", missing, STALE_PRESENCE_S,
                           "This runtime spawns its workers: the log above says why one is not running (a "
                           "configuration error such as a broker account mosquitto does not know yet: fix it and "
                           "restart the runtime; or one started elsewhere took over: this runtime's is started "
                           "again once the shard has had no live worker for %.0f s)" % STALE_PRESENCE_S if self.cfg.ingest.spawn
                           else "Start 'cloud-ingest --config <runtime.yaml> --shard K' for each")

    def report(self) -> dict:
        """``run.ingest_workers`` of report.json: the shards whose worker was heard from, by state."""
        return {"workers": self.workers, "forwarded_transfers": self.forwarded,
                "status": {str(k): v["state"] for k, v in sorted(self.worker_status.items())}}

    def view(self) -> dict:
        """The console's (``/api/status`` ``ingest_workers``): every shard, ``unknown`` for one never heard from."""
        return {"workers": self.workers, "forwarded_transfers": self.forwarded,
                "shards": {str(k): self.worker_status.get(k, {}).get("state", "unknown") for k in range(self.workers)}}

    def on_forward(self, shard: int, payload: bytes) -> None:
        """What ingest worker ``shard`` forwards: a transfer it reassembled and verified (judged here as if
        reassembled here), or bytes and a rejection to charge to a device. The topic is the runtime's own (no
        device credential may publish on it); the device named inside is the one whose topic the chunks came on."""
        try:
            header, body = P.decode_frame(payload)
        except P.ProtocolError as e:
            logger.warning("ingest worker %d: a malformed frame (%s)", shard, e)
            return
        device, type_ = header["device"], header["type"]
        if header["run"] != self.cfg.run_id or shard >= self.workers or header.get("workers") != self.workers:
            # a worker of another run, or one whose config says another count: its shards are not the devices'
            if shard not in self._misconfigured:
                self._misconfigured.add(shard)
                logger.error("ingest worker %d runs run %r with %s workers, this runtime %r with %d: its frames are "
                             "ignored; start it with this runtime's config", shard, header["run"][:40],
                             str(header.get("workers"))[:8], self.cfg.run_id, self.workers)
            return
        if type_ == P.INGEST_EVENT:
            kind, wire, reason = header.get("kind"), header.get("wire"), header.get("reason")
            if kind in ("rejected", "resent") and type(wire) is int and wire > 0:
                self.ingest.count(kind, device, wire)
            if isinstance(reason, str):  # as the runtime judges chunks itself: a quarantined device's are
                # "quarantined" (not a new offence that would extend its quarantine)
                was_quarantined = self.registry.quarantined(device)
                if reason == "quarantined" and not was_quarantined and device in self.registry.devices:
                    self.tell_worker(device, quarantined_for_s=0)  # released here: the worker heard late, or
                    # counted from a verdict it read late (it queued while the worker restarted)
                reason = "quarantined" if was_quarantined else reason[:64]
                self.registry.reject(reason, device, str(header.get("detail", ""))[:500])
                if not was_quarantined and self.registry.quarantined(device):
                    self.tell_quarantine(device)  # its worker drops its chunks from now on, unread
            return
        if type_ != P.INGESTED:
            logger.warning("ingest worker %d: unexpected frame type %r", shard, type_[:40])
            return
        refused = None  # part 0 stated more than the device may send: judged now, its parts never held
        try:
            done = self.forwards.add(shard, header, body)
        except ForwardRefused as e:
            done, refused = e.transfer, e.rejected
        if done is None:
            return
        device = done.device
        self.count_message()
        self.forwarded += 1
        judged = []   # the judge settles it (final verdict); otherwise the worker is told to reassemble a resend
        quarantined_before = self.registry.quarantined(device)

        def settle(accepted: bool, reason: str | None) -> None:
            judged.append(True)
            self.tell_worker(device, transfer=done.transfer, accepted=accepted, reason=reason,
                             decoded_limit=self.device_limit(device))
        try:
            if device not in self.registry.devices and self.late(device, "upload"):
                return
            if device not in self.registry.devices:
                raise Rejected("unknown_device", "upload before registration")
            if self.registry.quarantined(device):  # as its chunks would be without workers: charged, not judged
                self.ingest.count_rejected(device, done.wire_bytes)
                self.tell_quarantine(device)  # the worker did not know yet (it learns at the first forward)
                until = time.ctime(self.registry.devices[device]["quarantined_until"])
                raise Rejected("quarantined", f"ignored until {until}")
            if refused is None and done.meta.get("kind") == P.KIND_UPLOAD and done.meta.get("split") == "train":
                self.ingest.note_release(device, done.blob, done.sha256)
            self.judge(device, done, settle, refused)
        except Rejected as e:
            self.registry.reject(e.reason, device, e.detail)
        except P.ProtocolError as e:
            self.registry.reject(e.reason, device, str(e))
        except MessageError as e:
            self.registry.reject("bad_payload", device, str(e))
        except Exception as e:  # a bug costs one transfer, never the service
            logger.exception("internal error judging a forwarded transfer of %s", device)
            self.registry.reject("internal_error", device, f"{type(e).__name__}: {e}")
        finally:
            if not judged:
                self.tell_worker(device, transfer=done.transfer, retry=True)
            if not quarantined_before and self.registry.quarantined(device):  # this forward's rejection did it
                self.tell_quarantine(device)

    def device_limit(self, device: str) -> int | None:
        """The most any transfer of registered ``device`` may decompress to (its worker decompresses no more);
        None while the strategy cannot tell (its worker then forwards what the device sent as it is)."""
        limits = [self.decoded_limit(device, {"split": split}) for split in ("train", "test")]
        return None if None in limits else max(limits)

    def registered(self, device: str, again: bool) -> None:
        """``device`` registered (``again``: it had before, so its worker drops what its old process left open):
        its worker learns its decoded bound."""
        limit = self.device_limit(device)
        if again or limit is not None:
            self.tell_worker(device, forget=again, decoded_limit=limit)

    def check_forward(self, header: dict) -> None:
        """Part 0 of a worker's forward, before any of it is held: Rejected when it states more bytes than this
        coordinator would take of that transfer: what the strategy lets it decompress to when the worker
        decompressed it, else ``max_transfer_bytes`` (as the coordinator's own reassembler). A device that has
        not registered may send nothing."""
        device, size = header["device"], header.get("size")
        if device not in self.registry.devices:
            raise Rejected("unknown_device", "upload before registration")
        meta = header.get("meta") if isinstance(header.get("meta"), dict) else {}
        raw = header.get("packed") == "raw"
        limit = (self.decoded_limit(device, meta) or self.cfg.max_decoded_bytes) if raw else self.cfg.max_transfer_bytes
        if type(size) is int and size > limit:
            raise Rejected("oversized", f"transfer {str(header.get('transfer'))[:8]} "
                                        f"{'decompresses to' if raw else 'is'} {size} bytes > limit {limit}")

    def on_presence(self, topic: str, payload: bytes) -> None:
        """An ingest worker's retained presence (or its Last Will): logged when it changes, in report.json."""
        shard = topic.split("/")[-2]
        try:
            header, _ = P.decode_frame(payload, max_body=0)
            state = header.get("data", {}).get("state")
        except (P.ProtocolError, AttributeError):
            return
        if not shard.isdigit() or int(shard) >= self.workers or state not in ("online", "offline"):
            return
        if header["data"].get("workers") != self.workers and state == "online":  # a worker of another config
            state = "misconfigured"                                            # serves no shard of ours
        shard_, data = int(shard), header["data"]
        if self.worker_status.get(shard_, {}).get("state") != state:
            if state == "online":
                logger.info("ingest worker %d is online (pid %s on %s)", shard_, data.get("pid"), str(data.get("host"))[:64])
            elif state == "misconfigured":
                logger.error("ingest worker %d (pid %s on %s) runs with %s workers, this runtime with %d: its shard has "
                             "no worker; start it with this runtime's config", shard_, data.get("pid"),
                             str(data.get("host"))[:64], str(data.get("workers"))[:8], self.workers)
            elif shard_ not in self.worker_status:  # the last presence an earlier run left: its worker comes up next
                logger.info("ingest worker %d: offline so far (its last presence)", shard_)
            else:
                logger.warning("ingest worker %d is offline: the devices of its shard cannot upload until a worker "
                               "serves it again (their chunks queue at the broker)", shard_)
        if self.worker_status.get(shard_, {}).get("state") == "stale" and state == "online":
            logger.info("ingest worker %d is online again", shard_)
        self.worker_status[shard_] = {"state": state, "since": time.time(), "seen": time.monotonic()}

    def tell_worker(self, device: str, **data) -> None:
        """A :data:`~edgefl_core.wire.VERDICT` to ``device``'s ingest worker: a transfer's verdict, or ``forget``."""
        self.transport.publish(self.topics.verdicts(P.ingest_shard(self.cfg.run_id, device, self.workers)), P.encode_frame(
            {"type": P.VERDICT, "run": self.cfg.run_id, "device": device, "round": -1, **data}))

    def tell_quarantine(self, device: str) -> None:
        """Tell ``device``'s ingest worker that the device is quarantined, for how many seconds more (relative:
        the worker's clock may differ): it drops the device's chunks unread meanwhile and charges them in bulk,
        instead of reassembling and forwarding what the coordinator would refuse."""
        left = self.registry.devices[device]["quarantined_until"] - time.time()
        if left > 0:
            self.tell_worker(device, quarantined_for_s=round(left, 1))


class ForwardAssembler:
    """The coordinator's side of the forwards: each worker's transfer in progress, by shard, put together from
    its INGESTED parts (at most ``max_bytes``). ``retry(device, transfer)`` tells a worker to reassemble a
    transfer afresh when its forward was cut short. ``check(header)`` judges part 0 before anything is held: it
    raises Rejected when the transfer states more bytes than its device may send (a worker whose bound for the
    device is out of date decompresses up to :data:`~cloud_runtime.ingest_worker.MAX_FORWARD_INFLATION` times
    what the device sent)."""

    def __init__(self, max_bytes: int, retry: Callable[[str, str], None],
                 check: Callable[[dict], None] = lambda header: None):
        self.max_bytes, self.retry, self.check = max_bytes, retry, check
        self._held: dict[int, dict] = {}  # shard -> {"header": part 0's, "parts": [...], "bytes": n}
        self._refused: OrderedDict[tuple, None] = OrderedDict()  # (device, transfer) judged from part 0: the
        # rest of their parts are dropped unread, wherever they come (a stray one must not reopen the verdict)

    def add(self, shard: int, header: dict, body: bytes) -> CompletedTransfer | None:
        """Append one part of worker ``shard``'s forward; the transfer once its last part is in. A worker forwards
        one transfer at a time and its parts arrive in order, so only the one in progress is held; a gap (the
        worker restarted mid-forward) drops it, and the device's sender asks again and re-sends. Part 0 that
        ``check`` refuses raises ForwardRefused (the transfer as stated, no bytes held); the rest of its parts
        are dropped unread."""
        part, parts, size = header.get("part"), header.get("parts"), header.get("size")
        key = (header["device"], str(header.get("transfer"))[:64])
        if key in self._refused and part != 0:
            return None
        held = self._held.get(shard)
        if part == 0:
            if held is not None and (held["header"]["device"], held["header"].get("transfer")) != \
                    (header["device"], header.get("transfer")):
                self.retry(held["header"]["device"], str(held["header"].get("transfer"))[:64])  # a forward cut
            try:                                                                      # short: reassembled afresh
                self.check(header)
            except Rejected as e:
                self._held.pop(shard, None)
                self._refused[key] = None
                while len(self._refused) > REFUSED_REMEMBERED:
                    self._refused.popitem(last=False)
                raise ForwardRefused(_transfer(header, b"", 0), e) from None
            self._refused.pop(key, None)   # forwarded again in a form that passes: its parts are held now
            held = self._held[shard] = {"header": header, "parts": [], "bytes": 0}
        if type(part) is not int or type(parts) is not int or type(size) is not int or held is None \
                or (held["header"].get("transfer"), held["header"]["device"]) != (header.get("transfer"), header["device"]) \
                or len(held["parts"]) != part \
                or held["header"].get("parts") != parts or held["bytes"] + len(body) > min(size, self.max_bytes):
            self._held.pop(shard, None)
            logger.warning("ingest worker %d: part %s of %s of %s's transfer %s is out of sequence: the transfer is "
                           "dropped (its device re-sends it)", shard, str(part)[:12], str(parts)[:12], header["device"],
                           str(header.get("transfer"))[:8])
            for lost in {(h["device"], h.get("transfer")) for h in (header, held["header"] if held else header)}:
                if isinstance(lost[1], str):   # the worker reassembles their resends afresh
                    self.retry(lost[0], lost[1][:64])
            return None
        held["parts"].append(body)
        held["bytes"] += len(body)
        if part < parts - 1:
            return None
        del self._held[shard]
        return _transfer(held["header"], b"".join(held["parts"]), held["bytes"])


class ForwardRefused(Exception):
    """Part 0 of a forward was refused (:meth:`ForwardAssembler.add`): ``transfer`` as its header states it
    (no blob), ``rejected`` why."""

    def __init__(self, transfer: CompletedTransfer, rejected: Rejected):
        super().__init__(str(rejected))
        self.transfer, self.rejected = transfer, rejected


def _transfer(first: dict, blob: bytes, held_bytes: int) -> CompletedTransfer:
    """A forwarded transfer from its part 0 header (what the worker states of it) and the blob put together."""
    meta, wire, chunks = first.get("meta"), first.get("wire_bytes"), first.get("chunks")
    return CompletedTransfer(first["device"], first["round"], str(first.get("transfer", ""))[:64],
                             meta if isinstance(meta, dict) else {}, blob,
                             wire if type(wire) is int and wire >= 0 else held_bytes,
                             chunks if type(chunks) is int else 1, str(first.get("sha256", "")),
                             "raw" if first.get("packed") == "raw" else "zstd")
