"""Reliable uploads through a real mosquitto with room and with tight queue limits, side by side.

    python -m bench.reliable --chunks 1000 --senders 2

A receiver (the runtime's reassembler and progress answers, on the paho transport) and ``--senders``
senders (the agent's TransferSender) each sending one transfer of ``--chunks`` 2 KiB chunks, first
through a mosquitto with room (the embedded default), then through one with ``max_queued_messages 5``
and ``max_inflight_messages 1`` (which drops QoS 1 messages over the limit). Prints seconds, chunks/s,
re-sent chunks and timeouts per broker, and the ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import queue
import threading
import time

from edgefl_cli.mosquitto import EmbeddedMosquitto
from edgefl_core.chunking import Reassembler, transfer_chunks
from edgefl_core.reliable import TransferSender, parse_progress
from edgefl_core.transport.mqtt import MqttTransport
from edgefl_core.wire import ACK, Topics, control_frame, decode_frame

RUN = "bench"


def receiver(url: str, stop: threading.Event, done: dict) -> None:
    topics = Topics(RUN)
    transport = MqttTransport(url, "bench-receiver")
    inbox: queue.Queue = queue.Queue()
    transport.subscribe(topics.all_up, lambda t, p: inbox.put((t, p)), retained=False)
    transport.connect()
    reassembler = Reassembler()
    while not stop.is_set():
        try:
            topic, payload = inbox.get(timeout=0.05)
        except queue.Empty:
            continue
        header, body = decode_frame(payload)
        device = topics.device_of(topic)
        finished = reassembler.add(header, body)
        if finished is not None:
            reassembler.settle(device, finished.transfer, True)
            done[device] = time.perf_counter()
        data = reassembler.progress(device, header["transfer"], header.get("ack"))
        if data is not None:
            transport.publish(topics.down(device), control_frame(ACK, run=RUN, device=device, round_=0, **data),
                              qos=0 if not data["final"] else 1)
    transport.close()


def sender(url: str, device: str, chunks: int, result: dict) -> None:
    topics = Topics(RUN)
    transport = MqttTransport(url, f"bench-{device}")
    inbox: queue.Queue = queue.Queue()
    transport.subscribe(topics.down(device), lambda t, p: inbox.put(p))
    transport.connect()
    blob = os.urandom(2048 * chunks)
    parts = transfer_chunks(blob, run=RUN, device=device, round_=0, meta={"kind": "upload"}, max_chunk=2048)
    s = TransferSender(parts, lambda frame: transport.publish(topics.up(device), frame))

    def poll(timeout: float) -> None:
        try:
            payload = inbox.get(timeout=timeout)
        except queue.Empty:
            return
        while True:
            header, _ = decode_frame(payload)
            progress = parse_progress(header["data"])
            if progress is not None:
                s.on_progress(progress, time.monotonic())
            try:
                payload = inbox.get_nowait()
            except queue.Empty:
                return
    start = time.perf_counter()
    verdict = s.run(poll, connected=lambda: transport.connected)
    result[device] = {"seconds": time.perf_counter() - start, "accepted": verdict.accepted, "sends": s.sends,
                      "resends": s.resends, "timeouts": s.timeouts}
    transport.close()


def trial(extra_config: str, chunks: int, senders: int) -> dict:
    with EmbeddedMosquitto(extra_config=extra_config) as broker:
        stop, done, results = threading.Event(), {}, {}
        rx = threading.Thread(target=receiver, args=(broker.url, stop, done))
        rx.start()
        time.sleep(0.5)
        start = time.perf_counter()
        threads = [threading.Thread(target=sender, args=(broker.url, f"d{i}", chunks, results)) for i in range(senders)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
        stop.set()
        rx.join()
    total = chunks * senders
    return {"seconds": round(seconds, 2), "chunks_per_s": round(total / seconds), "delivered": len(done),
            "resends": sum(r["resends"] for r in results.values()),
            "timeouts": sum(r["timeouts"] for r in results.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=1000)
    parser.add_argument("--senders", type=int, default=2)
    args = parser.parse_args(argv)
    roomy = trial("", args.chunks, args.senders)
    tight = trial("max_queued_messages 5\nmax_inflight_messages 1\n", args.chunks, args.senders)
    print(json.dumps({"command": f"python -m bench.reliable --chunks {args.chunks} --senders {args.senders}",
                      "roomy_broker": roomy, "queue_limited_broker": tight,
                      "slowdown": round(tight["seconds"] / roomy["seconds"], 2)}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
