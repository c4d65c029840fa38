"""Reliable transfers (items 7, 11, 12 of the trust-boundary issue): a sender that finishes through a broker
that drops messages, and a reassembler whose memory is bounded as bytes arrive."""
import os
import random
from collections import deque

import numpy as np
import pytest
import zstandard

from edgefl_core.chunking import Reassembler, transfer_chunks
from edgefl_core.codecs import pack_arrays, unpack_arrays
from edgefl_core.reliable import Progress, TransferSender, parse_progress, missing_ranges
from edgefl_core.wire import ProtocolError, decode_frame


class LossyBroker:
    """A broker in front of one slow subscriber: a bounded queue (tail drop, like mosquitto's
    max_queued_messages) drained ``rate`` messages per tick, plus random loss of answers."""

    def __init__(self, receiver: Reassembler, capacity: int, rate: int, answer_loss: float = 0.0, seed: int = 0):
        self.receiver, self.capacity, self.rate = receiver, capacity, rate
        self.queue: deque = deque()
        self.answers: deque = deque()
        self.dropped = 0
        self.answer_loss = answer_loss
        self.rng = random.Random(seed)
        self.completed = []
        self.verdict = (True, None)

    def publish(self, frame: bytes) -> None:
        if len(self.queue) >= self.capacity:
            self.dropped += 1
            return
        self.queue.append(frame)

    def tick(self) -> None:
        for _ in range(min(self.rate, len(self.queue))):
            header, body = decode_frame(self.queue.popleft())
            done = self.receiver.add(header, body)
            if done is not None:
                self.completed.append(done)
                self.receiver.settle(done.device, done.transfer, *self.verdict)
            data = self.receiver.progress(header["device"], header["transfer"], header.get("ack"))
            if data is not None and self.rng.random() >= self.answer_loss:
                self.answers.append(data)


def run_sender(sender, broker, max_ticks=200_000):
    clock = [0.0]

    def poll(timeout):
        broker.tick()
        while broker.answers:
            sender.on_progress(parse_progress(broker.answers.popleft()), clock[0])
        clock[0] += 0.001  # one tick is a millisecond

    for _ in range(max_ticks):
        sender.pump(clock[0])
        sender.check_timeout(clock[0])
        poll(0)
        if sender.verdict is not None:
            return sender.verdict, clock[0]
    raise AssertionError("the transfer never finished")


def chunks_of(nbytes, chunk=2048, seed=0):
    blob = np.random.default_rng(seed).bytes(nbytes)
    return blob, transfer_chunks(blob, run="r", device="d", round_=0, meta={"kind": "upload"}, max_chunk=chunk)


@pytest.mark.parametrize("capacity,rate", [(6, 1), (6, 3), (1000, 50)])
def test_a_transfer_finishes_through_a_broker_that_drops_over_its_queue_limit(capacity, rate):
    blob, chunks = chunks_of(2048 * 600)
    broker = LossyBroker(Reassembler(), capacity, rate)
    sender = TransferSender(chunks, broker.publish, window=16)
    verdict, _ = run_sender(sender, broker)
    assert verdict.accepted and len(broker.completed) == 1 and broker.completed[0].blob == blob
    if capacity == 6:
        assert broker.dropped > 0 and sender.resends > 0  # the broker did drop; the sender made up for it
    assert sender.sends <= 3 * len(chunks)  # paced by answers, not by blind re-sending


def test_lost_answers_cost_time_never_the_transfer():
    blob, chunks = chunks_of(2048 * 200, seed=1)
    broker = LossyBroker(Reassembler(), 6, 2, answer_loss=0.5, seed=3)
    verdict, _ = run_sender(TransferSender(chunks, broker.publish), broker)
    assert verdict.accepted and broker.completed[0].blob == blob


def test_a_rejected_transfer_ends_with_the_reason_and_a_resend_gets_the_same_answer():
    _, chunks = chunks_of(2048 * 10)
    broker = LossyBroker(Reassembler(), 100, 100)
    broker.verdict = (False, "bad_shape")
    verdict, _ = run_sender(TransferSender(chunks, broker.publish), broker)
    assert not verdict.accepted and verdict.reason == "bad_shape"
    # the same transfer again (a restarted sender): the receiver remembers its verdict
    again, _ = run_sender(TransferSender(chunks, broker.publish), broker)
    assert (again.accepted, again.reason) == (False, "bad_shape") and len(broker.completed) == 1


def test_nothing_is_sent_while_the_broker_is_unreachable():
    _, chunks = chunks_of(2048 * 4)
    sent = []
    sender = TransferSender(chunks, sent.append)
    up = [False]
    polls = []

    def poll(timeout):
        polls.append(timeout)
        if len(polls) == 50:
            up[0] = True
        if len(polls) == 60:
            sender.on_progress(Progress(sender.transfer, True, True), 0)
    assert sender.run(poll, connected=lambda: up[0]).accepted
    assert len(polls) == 60 and len(sent) == len(chunks)  # nothing queued while down, each chunk once after


def test_an_unanswered_transfer_backs_off_and_asks_again():
    _, chunks = chunks_of(2048 * 3)
    sent = []
    sender = TransferSender(chunks, sent.append, min_rto=0.5, max_rto=4.0)
    sender.pump(0.0)
    assert len(sent) == 3
    times = []
    now = 0.0
    while now < 60:
        now += 0.1
        before = len(sent)
        sender.check_timeout(now)
        sender.pump(now)
        if len(sent) > before:
            times.append(now)
    gaps = np.diff(times)
    assert gaps[0] < gaps[-1] and gaps[-1] <= 4.2  # exponential backoff, capped


@pytest.mark.parametrize("data", [
    {}, {"transfer": 3}, {"transfer": "t", "final": True}, {"transfer": "t", "final": True, "accepted": "yes"},
    {"transfer": "t", "final": False, "high": "1", "missing": [], "more": False},
    {"transfer": "t", "final": False, "high": 1, "missing": [[2, 1]], "more": False},
    {"transfer": "t", "final": False, "high": 1, "missing": [[1]], "more": False},
    {"transfer": "t", "final": False, "high": 1, "missing": "all", "more": False},
    {"transfer": "t", "final": False, "high": 1, "missing": [[0, 1]] * 600, "more": False},
    {"transfer": "t", "final": False, "high": 1, "missing": [], "more": False, "seq": 1.5},
])
def test_a_malformed_answer_is_ignored(data):
    assert parse_progress(data) is None


def test_missing_ranges():
    assert missing_ranges({0, 1, 4, 7}, 9) == ([[2, 3], [5, 6], [8, 9]], False)
    assert missing_ranges(set(), -1) == ([], False)
    ranges, more = missing_ranges(set(range(0, 4000, 2)), 3999, limit=10)
    assert more and len(ranges) == 10


# -- bounded reassembly (item 7) ----------------------------------------------------------------------


def chunk_header(transfer="t1", index=0, count=1000, size=1 << 30, body=b"", device="d"):
    import hashlib
    import zlib
    header = {"type": "chunk", "run": "r", "device": device, "round": 0, "transfer": transfer, "index": index,
              "count": count, "size": size, "crc32": zlib.crc32(body), "sha256": hashlib.sha256(b"x").hexdigest()}
    if index == 0:
        header["meta"] = {}
    return header


def test_a_transfer_never_holds_more_than_it_announced():
    r = Reassembler(max_transfer_bytes=1 << 20)
    body = os.urandom(4096)
    r.add(chunk_header(index=0, count=100, size=6000, body=body), body)
    with pytest.raises(ProtocolError) as e:
        r.add(chunk_header(index=1, count=100, size=6000, body=body), body)
    assert e.value.reason == "oversized"
    assert r.held_bytes("d") == 4096


def test_a_device_cannot_hold_more_than_its_quota_in_open_transfers():
    r = Reassembler(max_transfer_bytes=8 << 20, max_pending_bytes_per_device=3 << 20)
    body = os.urandom(1 << 20)
    for t in range(3):
        r.add(chunk_header(transfer=f"t{t}", index=1, count=4, size=4 << 20, body=body), body)
    with pytest.raises(ProtocolError) as e:
        r.add(chunk_header(transfer="t9", index=1, count=4, size=4 << 20, body=body), body)
    assert e.value.reason == "over_quota"
    r.add(chunk_header(transfer="h1", index=1, count=2, size=2 << 20, body=body, device="honest"), body)  # others unaffected


def test_a_zstd_bomb_is_refused_before_it_is_allocated():
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (256 << 20))
    assert len(bomb) < 64 << 10
    with pytest.raises(ProtocolError) as e:
        unpack_arrays(bomb, 1 << 20)
    assert e.value.reason == "oversized"
    no_size = zstandard.ZstdCompressor(write_content_size=False).compress(b"\0" * 1000)
    with pytest.raises(ProtocolError) as e:
        unpack_arrays(no_size, 1 << 20)
    assert e.value.reason == "bad_compression"
    assert unpack_arrays(pack_arrays({"a": np.arange(3)}))["a"].tolist() == [0, 1, 2]


def test_a_transfer_the_receiver_forgot_is_sent_again_from_what_it_lacks():
    """The runtime dropped a half-received transfer (idle expiry after a long broker outage): its answers now
    list chunks it had acknowledged before, and the sender must send those again (it once looped forever)."""
    blob, chunks = chunks_of(2048 * 24, seed=4)
    receiver = Reassembler()
    broker = LossyBroker(receiver, 1000, 1000)
    sender = TransferSender(chunks, broker.publish, window=12)
    sender.pump(0.0)
    broker.tick()
    while broker.answers:
        sender.on_progress(parse_progress(broker.answers.popleft()), 0.0)
    assert sum(sender.received) == 12 and sender.verdict is None
    receiver.expire(now=1e12)  # the runtime forgets the transfer
    verdict, _ = run_sender(sender, broker)
    assert verdict.accepted and broker.completed[0].blob == blob


def test_answers_cost_the_same_however_far_apart_the_held_chunks_are():
    import time
    r = Reassembler(max_transfer_bytes=256 << 20)
    body = b"x" * 1024
    size = 256 << 20
    header = chunk_header(transfer="far", index=size // 1024 - 1, count=size // 1024, size=size, body=body)
    r.add(header, body)
    start = time.perf_counter()
    for _ in range(200):
        data = r.progress("d", "far", 1)
    assert time.perf_counter() - start < 0.5 and data["missing"] == [[0, size // 1024 - 2]]
    with pytest.raises(ProtocolError, match="empty"):
        r.add(chunk_header(transfer="far", index=5, count=size // 1024, size=size, body=b""), b"")
