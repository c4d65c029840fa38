"""Reliable transfers over a broker that may drop messages: selective-repeat ARQ paced by the receiver.

MQTT QoS 1 promises delivery only as far as the broker: a broker over its queue limits
(mosquitto's ``max_queued_messages``, ``max_inflight_messages``) drops messages for a slow
subscriber without telling the publisher. So a device's transfer is done only when the runtime
says so. Every chunk the sender publishes carries ``ack: <seq>`` (its send sequence number); the
receiver answers each one on the device's downlink with a progress frame (:func:`progress_data`):
the highest chunk index it holds, the missing indices below it as ranges, and the ``seq`` it
answers. A chunk still missing that was sent *before* the answered one is lost (one publisher's
messages arrive in order), so it is sent again. The window of chunks in flight grows while nothing
is lost and halves on a loss (TCP's AIMD, RFC 5681); when no answer comes for ``rto`` seconds every
chunk in flight is presumed lost, the window drops to one and ``rto`` doubles (RFC 6298's backoff).
When the transfer is complete the receiver's answer is final: ``accepted`` true, or false with a
``reason`` (the upload was rejected: re-sending it would not help).

Torch-free: the onnxruntime edge and the torch edge send through the same class.
"""
from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

from edgefl_core.wire import encode_frame

MAX_MISSING_RANGES = 64  # per answer: keeps answers small (a sender re-asks for the rest)


@dataclass
class Progress:
    """A receiver's answer for one transfer (parsed from an ACK frame's ``data``).

    ``final``: the transfer is complete and judged (``accepted``, ``reason``); otherwise ``high`` is the
    highest chunk index held (-1: none), ``missing`` the [first, last] index ranges below it not held,
    ``more`` whether that list was cut at :data:`MAX_MISSING_RANGES`, ``seq`` the chunk answered (or None).
    """

    transfer: str
    final: bool
    accepted: bool = False
    reason: str | None = None
    high: int = -1
    missing: tuple[tuple[int, int], ...] = ()
    more: bool = False
    seq: int | None = None


def missing_ranges(held: set[int] | dict, high: int, limit: int = MAX_MISSING_RANGES, low: int = 0
                   ) -> tuple[list[list[int]], bool]:
    """Index ranges in [low, high] not in ``held`` (every index below ``low`` is held), as ``[[first, last], ...]``;
    and whether the list was cut at ``limit`` ranges."""
    ranges: list[list[int]] = []
    start = None
    for i in range(low, high + 1):
        if i not in held:
            if start is None:
                start = i
        elif start is not None:
            ranges.append([start, i - 1])
            start = None
            if len(ranges) >= limit:
                return ranges, True
    if start is not None:
        ranges.append([start, high])
    return ranges, False


def progress_data(transfer: str, *, high: int, held, seq: int | None, low: int = 0) -> dict:
    """The ``data`` of a progress ACK for a transfer still incomplete (``low``: every index below it is held)."""
    ranges, more = missing_ranges(held, high, low=low)
    return {"transfer": transfer, "final": False, "high": high, "missing": ranges, "more": more, "seq": seq}


def parse_progress(data: dict) -> Progress | None:
    """A progress or verdict ACK's ``data`` as :class:`Progress`; None when it is not one (strictly typed)."""
    transfer = data.get("transfer")
    if not isinstance(transfer, str):
        return None
    if data.get("final", True) is not False:   # verdict ACKs (and ACKs from before progress existed)
        accepted = data.get("accepted")
        if type(accepted) is not bool:
            return None
        reason = data.get("reason")
        return Progress(transfer, True, accepted, reason if isinstance(reason, str) else None)
    high, seq, more, raw = data.get("high"), data.get("seq"), data.get("more"), data.get("missing")
    if type(high) is not int or type(more) is not bool or not isinstance(raw, list) or len(raw) > MAX_MISSING_RANGES:
        return None
    if seq is not None and type(seq) is not int:
        return None
    ranges = []
    for item in raw:
        if not (isinstance(item, list) and len(item) == 2 and all(type(v) is int for v in item) and item[0] <= item[1]):
            return None
        ranges.append((item[0], item[1]))
    return Progress(transfer, False, high=high, missing=tuple(ranges), more=more, seq=seq)


class TransferSender:
    """Sends one chunked transfer until the receiver's final answer (see the module docstring).

    ``chunks``: ``(header, body)`` per chunk index, as :func:`edgefl_core.chunking.transfer_chunks` makes
    them; ``publish(frame)`` puts one frame on the uplink. Window sizes count chunks.
    """

    def __init__(self, chunks: list[tuple[dict, bytes]], publish: Callable[[bytes], None], *, window: int = 16,
                 max_window: int = 256, min_rto: float = 0.2, max_rto: float = 30.0):
        self.chunks, self.publish = chunks, publish
        self.transfer: str = chunks[0][0]["transfer"]
        self.n = len(chunks)
        self.max_window, self.min_rto, self.max_rto = max_window, min_rto, max_rto
        self.cwnd = float(max(1, min(window, max_window)))
        self.ssthresh = float(max_window)
        self.rto = max(min_rto, 1.0)  # until the first answer gives a round-trip time
        self.srtt: float | None = None
        self.received = [False] * self.n
        self.max_received = -1                 # highest index the receiver has said it holds
        self.seq_of = [-1] * self.n            # send sequence number of each chunk's latest send
        self.sent_at: dict[int, float] = {}    # seq -> when (for round-trip times)
        self.seq = 0
        self.outstanding: set[int] = set()     # sent, not yet held by the receiver, not presumed lost
        self.retransmit: deque[int] = deque()
        self.next_new = 0
        self.recovery_seq = -1                 # losses among sends up to this seq were already answered with a cut
        self.timer_start: float | None = None  # last answer (or first send into an idle window)
        self.verdict: Progress | None = None
        self.sends = 0
        self.resends = 0
        self.timeouts = 0
        self.first_bytes = 0    # wire bytes of each chunk's first send: what the runtime counts once accepted
        self.resent_bytes = 0   # wire bytes of the sends after a chunk's first

    # -- sending ------------------------------------------------------------------------------------

    def _send(self, index: int, now: float) -> None:
        header, body = self.chunks[index]
        frame = encode_frame({**header, "ack": self.seq}, body)
        self.publish(frame)
        if self.seq_of[index] >= 0:
            self.resends += 1
            self.resent_bytes += len(frame)
        else:
            self.first_bytes += len(frame)
        self.seq_of[index] = self.seq
        self.sent_at[self.seq] = now
        self.seq += 1
        self.sends += 1
        self.outstanding.add(index)

    def pump(self, now: float) -> None:
        """Send while the window has room."""
        if self.verdict is not None:
            return
        if not self.outstanding:
            self.timer_start = now
        while len(self.outstanding) < int(self.cwnd):
            if self.retransmit:
                index = self.retransmit.popleft()
                if self.received[index] or index in self.outstanding:
                    continue
            elif self.next_new < self.n:
                index = self.next_new
                self.next_new += 1
            else:
                break
            self._send(index, now)

    # -- answers --------------------------------------------------------------------------------------

    def on_progress(self, p: Progress, now: float) -> None:
        if p.transfer != self.transfer or self.verdict is not None:
            return
        if p.final:
            self.verdict = p
            return
        self.timer_start = now
        if p.seq is not None and p.seq in self.sent_at:
            sample = now - self.sent_at[p.seq]
            self.srtt = sample if self.srtt is None else 0.875 * self.srtt + 0.125 * sample
        self.rto = min(self.max_rto, max(self.min_rto, 4 * (self.srtt or 0.25)))
        missing = set()
        for first, last in p.missing:
            missing.update(range(max(first, 0), min(last, self.n - 1) + 1))
        limit = min(p.high, self.n - 1) if not p.more else min(max((r[1] for r in p.missing), default=-1), self.n - 1)
        # the receiver's word is final: a chunk it lacks is sent again even if an earlier answer had it (the
        # receiver dropped the transfer: expiry, restart) -- everything above its highest held index too
        forgotten = [i for i in missing if self.received[i]]
        if p.high < self.max_received:
            forgotten += [i for i in range(max(p.high + 1, 0), self.max_received + 1) if self.received[i]]
            self.max_received = p.high
        for index in sorted(set(forgotten)):
            self.received[index] = False
            self.retransmit.append(index)
        newly = 0
        for index in list(self.outstanding) + list(self.retransmit):
            if index <= limit and index not in missing and not self.received[index]:
                self.received[index] = True
                self.max_received = max(self.max_received, index)
                self.outstanding.discard(index)
                newly += 1
        answered = p.seq if p.seq is not None else -1
        lost = sorted(i for i in self.outstanding if i in missing and self.seq_of[i] < answered)
        if lost:
            self.outstanding.difference_update(lost)
            self.retransmit.extendleft(reversed(lost))
            if min(self.seq_of[i] for i in lost) > self.recovery_seq:  # one cut per window of losses
                self.ssthresh = self.cwnd = max(1.0, self.cwnd / 2)
                self.recovery_seq = self.seq - 1
        elif newly:
            if self.cwnd < self.ssthresh:
                self.cwnd = min(self.max_window, self.cwnd + newly)           # slow start
            else:
                self.cwnd = min(self.max_window, self.cwnd + newly / self.cwnd)  # congestion avoidance
        for seq in [s for s in self.sent_at if s <= answered]:
            del self.sent_at[seq]

    def check_timeout(self, now: float) -> None:
        """No answer for ``rto`` seconds: everything in flight is presumed lost (window 1, ``rto`` doubles).
        With nothing in flight and no verdict yet, the last chunk goes again to ask for one."""
        if self.verdict is not None or self.timer_start is None or now - self.timer_start < self.rto:
            return
        self.timeouts += 1
        self.ssthresh = max(1.0, self.cwnd / 2)
        self.cwnd = 1.0
        self.rto = min(self.max_rto, self.rto * 2)
        self.timer_start = now
        if self.outstanding:
            self.retransmit.extendleft(sorted(self.outstanding, reverse=True))
            self.outstanding.clear()
        elif not self.retransmit and self.next_new >= self.n:
            self.retransmit.append(self.n - 1)

    def run(self, poll: Callable[[float], None], *, connected: Callable[[], bool] = lambda: True,
            abort: Callable[[], bool] = lambda: False, clock: Callable[[], float] = time.monotonic,
            ) -> Progress | None:
        """Send until the final answer (returned) or ``abort()`` (None). ``poll(timeout)`` handles incoming
        messages (which call :meth:`on_progress`). While ``connected()`` is false nothing is sent and no timer
        runs: a broker that is down is waited for, not flooded."""
        while self.verdict is None:
            if abort():
                return None
            now = clock()
            if connected():
                self.pump(now)
                self.check_timeout(now)
            else:
                self.timer_start = now
            poll(min(0.05, self.rto / 4))
        return self.verdict
