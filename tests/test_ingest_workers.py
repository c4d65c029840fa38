"""Sharded ingest on the in-memory bus (``cloud_runtime/ingest_worker.py``): what two workers forward is judged
as if the coordinator had reassembled it, what they refuse is charged to the device with the reason, verdicts
reach the worker that answers the sender, and a forward cut short is dropped, never half-accepted. The real
processes over mosquitto (and the kill -9 drill) are in ``test_distributed_system.py``; two workers of one shard
in ``test_session_takeover.py``."""
import numpy as np
import pytest

from cloud_runtime.ingest_worker import FORGET_IDLE_S, FORWARD_PART_BYTES, IngestWorker
from edge_sdk import protocol as P
from edge_sdk.uplink import Uplink
from edge_sdk.config import UploadConfig
from edgefl_core.config import ConfigError
from edgefl_core.transport import MemoryBus
from edgefl_core.transport.inbox import drain
from test_trust_boundary import RUN, runtime, upload_frames

SHARD = {"devA": 1, "devB": 0, "devC": 1}   # sha256("trust/<id>") mod 2 (test_the_shard_is_stable pins it)


def cluster(tmp_path, *overrides, register=("devA", "devB")):
    bus = MemoryBus()
    rt = runtime(tmp_path, bus, "ingest.workers=2", *overrides, register=register)
    workers = [IngestWorker(rt.cfg, bus.client(f"ingest-{k}"), k) for k in range(2)]
    rt.start()
    for w in workers:
        start(w)
    downs = {}
    for device in ("devA", "devB", "devC"):
        downs[device] = []
        bus.client(f"sub-{device}").subscribe(rt.topics.down(device),
                                              lambda t, p, d=device: downs[d].append(P.decode_frame(p)[0]))
    return bus, rt, workers, downs


def start(worker):
    """Start a worker and let it claim its shard (the serve loop does so once the presence topic's retained
    message is read, or after RECLAIM_WAIT_S without one)."""
    assert worker.start()
    drain(worker.inbox, worker.handle, 0.01)
    worker._keep_claim(now=float("inf"))


def settle(rt, workers, rounds=4):
    for _ in range(rounds):
        for w in workers:
            drain(w.inbox, w.handle, 0.01)
        rt.pump(0.01)


def acks(downs, device):
    return [h["data"] for h in downs[device] if h["type"] == P.ACK and h["data"].get("final")]


def test_the_shard_is_stable_and_spreads_similar_ids():
    assert {d: P.ingest_shard(RUN, d, 2) for d in SHARD} == SHARD
    assert P.ingest_shard(RUN, "devA", 1) == 0 and P.ingest_shard(RUN, "devA", 0) == 0
    assert len({P.ingest_shard("quickstart", f"dev{i}", 4) for i in range(8)}) == 4   # not crc32's low bits
    topics = P.Topics(RUN)
    assert topics.sharded_device_of(topics.up("devA", 1)) == ("devA", 1)
    assert topics.sharded_device_of(topics.up("devA")) is None and topics.device_of(topics.up("devA", 1)) is None
    assert topics.ingest_shard_of(topics.ingest(3)) == 3 and topics.ingest_shard_of(topics.verdicts(3)) is None


def test_a_device_sends_to_the_shard_its_run_recipe_names(tmp_path):
    uplink = Uplink(MemoryBus().client("devA"), P.Topics(RUN), "devA", UploadConfig())
    assert uplink.topic == P.Topics(RUN).up("devA")
    uplink.use_shards(2)
    assert uplink.topic == P.Topics(RUN).up("devA", SHARD["devA"])
    for junk in (0, -1, True, "2", 2.0, 10**9, None):  # not a worker count: the runtime's own uplink
        uplink.use_shards(junk)
        assert uplink.topic == P.Topics(RUN).up("devA")
    bus, rt, workers, downs = cluster(tmp_path)
    assert rt.downlink.recipe["ingest_shards"] == 2  # rides on every HELLO / ROUND


def test_the_runtime_knows_which_workers_are_online(tmp_path, caplog):
    bus, rt, workers, downs = cluster(tmp_path)
    settle(rt, workers)
    assert {k: v["state"] for k, v in rt.shards.worker_status.items()} == {0: "online", 1: "online"}
    workers[1].close()
    settle(rt, workers)
    assert rt.shards.worker_status[1]["state"] == "offline" and "ingest worker 1 is offline" in caplog.text
    assert rt.report()["run"]["ingest_workers"]["status"] == {"0": "online", "1": "offline"}
    # the operator's console and /metrics say the same
    from prometheus_client import generate_latest
    from cloud_runtime.console.metrics import metrics_registry
    from cloud_runtime.console.views import StatusBoard
    board = StatusBoard()
    board.refresh(rt, force=True)
    assert board.read()["status"]["ingest_workers"] == {"workers": 2, "forwarded_transfers": 0,
                                                         "shards": {"0": "online", "1": "offline"}}
    text = generate_latest(metrics_registry(board, rt.telemetry, 10)).decode()
    assert 'edgefl_ingest_workers{state="online"} 1.0' in text and 'edgefl_ingest_workers{state="offline"} 1.0' in text
    assert "edgefl_ingest_forwarded_transfers_total 0.0" in text


def test_uploads_through_two_workers_are_judged_as_if_the_runtime_had_reassembled_them(tmp_path):
    direct = runtime(tmp_path / "direct")
    bus, rt, workers, downs = cluster(tmp_path / "sharded")
    frames = {d: upload_frames(d, range(30), seed=i) for i, d in enumerate(("devA", "devB"))}
    for device, fs in frames.items():
        for frame in fs:
            direct.handle(direct.topics.up(device), frame)
            bus.client(device).publish(rt.topics.up(device, SHARD[device]), frame)
    settle(rt, workers)
    assert [w.forwarded for w in workers] == [1, 1]   # devB on shard 0, devA on shard 1
    for device in ("devA", "devB"):
        assert acks(downs, device) == [{"transfer": acks(downs, device)[0]["transfer"], "final": True,
                                        "accepted": True, "reason": None}]
        assert rt.ingest.round_bytes["up"][device] == direct.ingest.round_bytes["up"][device] == sum(map(len, frames[device]))
        held, expected = rt.strategy.train_uploads[device], direct.strategy.train_uploads[device]
        assert np.array_equal(held.sample_ids, expected.sample_ids) and np.array_equal(held.labels, expected.labels)
        assert rt.registry.devices[device]["feature_releases"] == direct.registry.devices[device]["feature_releases"]
        # the worker learned the verdict: a sender that asks again is told it was accepted
        transfer = P.decode_frame(frames[device][0])[0]["transfer"]
        assert workers[SHARD[device]].reassembler.progress(device, transfer)["accepted"] is True
    assert rt.shards.forwarded == 2 and not rt.registry.rejections


def test_what_a_worker_refuses_is_charged_to_the_device_with_the_reason(tmp_path):
    bus, rt, workers, downs = cluster(tmp_path)
    frames = upload_frames("devA", range(30))
    header, body = P.decode_frame(frames[0])
    bad_crc = P.encode_frame({**header, "crc32": (header["crc32"] + 1) % 2**32}, body)
    devA = bus.client("devA")
    devA.publish(rt.topics.up("devA", SHARD["devA"]), bad_crc)
    devA.publish(rt.topics.up("devA", 1 - SHARD["devA"]), frames[0])               # not its shard
    devA.publish(rt.topics.up("devA", SHARD["devA"]), P.control_frame(P.REGISTER, run=RUN, device="devA", round_=-1))
    devA.publish(rt.topics.up("devA", SHARD["devA"]), P.encode_frame({**header, "device": "devB"}, body))  # spoofed
    settle(rt, workers)
    for w in workers:
        w._charge_bulk(force=True)
    settle(rt, workers)
    reasons = rt.registry.devices["devA"]["rejection_reasons"]
    assert reasons == {"bad_checksum": 1, "wrong_shard": 1, "bad_type": 1, "spoofed_device": 1}, reasons
    assert rt.ingest.round_bytes["rejected"]["devA"] > 0 and not rt.registry.devices["devB"]["rejected"]
    assert sum(w.refused for w in workers) == 4 and rt.shards.forwarded == 0


def test_a_rejected_transfer_is_acked_as_rejected_and_the_worker_answers_so(tmp_path):
    bus, rt, workers, downs = cluster(tmp_path)
    frames = upload_frames("devA", range(29))   # it registered 30 samples
    for frame in frames:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert acks(downs, "devA")[0]["accepted"] is False and acks(downs, "devA")[0]["reason"] == "sample_ids"
    transfer = P.decode_frame(frames[0])[0]["transfer"]
    assert workers[SHARD["devA"]].reassembler.progress("devA", transfer)["accepted"] is False
    assert rt.ingest.round_bytes["rejected"]["devA"] == sum(map(len, frames)) and "devA" not in rt.strategy.train_uploads


def test_a_forward_cut_short_is_dropped_and_the_resend_is_accepted(tmp_path):
    """A worker killed mid-forward: the parts it sent are dropped when the next forward starts (no half upload
    is judged), and the device's re-sent transfer, forwarded whole by the new worker, is accepted."""
    bus, rt, workers, downs = cluster(tmp_path, "validation.max_samples_per_device=100000",
                                      register=())
    rt.register("devA", {"num_classes": 10, "feature_channels": 4, "train_samples": 6000})
    frames = upload_frames("devA", range(6000), shape=(4, 8, 8))   # forwarded in several parts
    forwarded = []
    bus.client("spy").subscribe(rt.topics.ingest(SHARD["devA"]), lambda t, p: forwarded.append(p))
    for frame in frames:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    worker = workers[SHARD["devA"]]
    drain(worker.inbox, worker.handle, 0.01)
    parts = [P.decode_frame(p)[0] for p in forwarded if P.decode_frame(p)[0]["type"] == P.INGESTED]
    assert len(parts) >= 3 and all(len(P.decode_frame(p)[1]) <= FORWARD_PART_BYTES for p in forwarded)
    rt.inbox.clear()   # the coordinator saw none of it: now replay only the first part, as a dying worker
    rt.handle(rt.topics.ingest(SHARD["devA"]), forwarded[0])
    rt.handle(rt.topics.ingest(SHARD["devA"]), forwarded[-1])   # a gap: dropped
    assert "devA" not in rt.strategy.train_uploads and not acks(downs, "devA")
    for payload in forwarded:                                    # the new worker's whole forward
        rt.handle(rt.topics.ingest(SHARD["devA"]), payload)
    assert len(rt.strategy.train_uploads["devA"].sample_ids) == 6000 and acks(downs, "devA")[0]["accepted"]


def test_a_re_registration_makes_the_worker_forget_the_old_process_transfers(tmp_path):
    """Only the old process's: transfers idle for FORGET_IDLE_S (the new process may already be sending when
    the forget arrives), and none on a first registration (it once dropped the chunks of devices that began
    uploading before the runtime had handled their registration)."""
    bus, rt, workers, downs = cluster(tmp_path, register=())
    frames = upload_frames("devA", range(3000), shape=(4, 8, 8))
    assert len(frames) > 1
    registration = {"num_classes": 10, "feature_channels": 4, "train_samples": 3000}
    bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frames[0])
    settle(rt, workers)
    worker = workers[SHARD["devA"]]
    rt.register("devA", registration)                  # first registration, handled after the first chunk
    settle(rt, workers)
    assert worker.reassembler.held_bytes("devA") > 0   # kept
    rt.register("devA", registration)                  # re-registered, the transfer still moving: kept
    settle(rt, workers)
    assert worker.reassembler.held_bytes("devA") > 0
    for pending in worker.reassembler._pending.values():
        pending.started -= FORGET_IDLE_S + 1            # idle: the old process's
    rt.register("devA", registration)
    settle(rt, workers)
    assert worker.reassembler.held_bytes("devA") == 0
    assert rt.ingest.round_bytes["rejected"]["devA"] == len(frames[0])


def test_a_worker_refuses_a_shard_its_config_has_not():
    from cloud_runtime.config import load_runtime_config
    with pytest.raises(ConfigError, match="shard is in"):
        IngestWorker(load_runtime_config(None, ["ingest.workers=2"]), MemoryBus().client("w"), 2)
    with pytest.raises(ConfigError, match="ingest.workers is 0"):
        IngestWorker(load_runtime_config(None, []), MemoryBus().client("w"), 0)


# -- what an attacker with one device credential, or an unlucky operator, found (review of the first version) --


def test_a_meta_too_large_to_forward_is_refused_by_the_worker_which_keeps_running(tmp_path):
    """Chunk 0's meta in raw UTF-8 fits the 64 KiB header; re-encoded (\\u escapes) it would not: the worker
    refuses that transfer (ACK, charged, reason) instead of dying on it at every restart."""
    import json
    import struct
    bus, rt, workers, downs = cluster(tmp_path)
    header, body = P.decode_frame(upload_frames("devA", range(30))[0])
    header["meta"]["note"] = "\u00e9" * 20000
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode()
    frame = P.MAGIC + struct.pack(">I", len(raw)) + raw + body
    bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert acks(downs, "devA")[0]["accepted"] is False and acks(downs, "devA")[0]["reason"] == "header_too_large"
    assert rt.registry.devices["devA"]["rejection_reasons"] == {"header_too_large": 1}
    assert rt.ingest.round_bytes["rejected"]["devA"] == len(frame)
    test_uploads_through_two_workers_are_judged_as_if_the_runtime_had_reassembled_them(tmp_path / "after")


def test_a_zstd_bomb_is_forwarded_as_sent_and_refused_before_anything_is_allocated(tmp_path):
    import zstandard
    bus, rt, workers, downs = cluster(tmp_path, register=())
    rt.register("devA", {"num_classes": 10, "feature_channels": 4, "train_samples": 1})
    bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (160 << 20))  # past 1 sample's decoded bound
    frames = P.chunk_transfer(bomb, run=RUN, device="devA", round_=0,
                              meta={"kind": "upload", "split": "train", "codec": "fp16"})
    forwarded = []
    bus.client("spy").subscribe(rt.topics.ingest(SHARD["devA"]), lambda t, p: forwarded.append(len(p)))
    for frame in frames:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert len(forwarded) == 1 and forwarded[0] < 64 << 10           # as sent: a few KiB, not 160 MiB
    assert rt.registry.devices["devA"]["rejection_reasons"] == {"oversized": 1}
    assert acks(downs, "devA")[0]["reason"] == "oversized"
    direct = runtime(tmp_path / "direct", register=())
    direct.register("devA", {"num_classes": 10, "feature_channels": 4, "train_samples": 1})
    for frame in frames:
        direct.handle(direct.topics.up("devA"), frame)
    assert direct.registry.devices["devA"]["rejection_reasons"] == {"oversized": 1}
    transfer = P.decode_frame(frames[0])[0]["transfer"]   # a verdict (it once had none: the sender asked for ever)
    assert direct.ingest.reassembler.progress("devA", transfer)["accepted"] is False
    assert direct.ingest.round_bytes["rejected"]["devA"] == rt.ingest.round_bytes["rejected"]["devA"]


def oversized_upload(rt, device):
    """A transfer that compresses about 2x (within a worker's inflation cap) and decompresses to 8 MiB, far
    past what ``device`` (1 sample registered) may send."""
    raw = np.random.default_rng(0).integers(0, 256, 8 << 20, dtype=np.uint8)
    raw[::2] = 0
    blob = P.pack_arrays({"features": raw})
    assert len(blob) * 4 > raw.nbytes > 4 * rt.shards.device_limit(device)
    return P.chunk_transfer(blob, run=RUN, device=device, round_=0,
                            meta={"kind": "upload", "split": "train", "codec": "fp16"})


def spy_on_forwards(bus, rt, shard):
    """(headers, raw frames) the worker of ``shard`` forwards, and the bytes the coordinator holds after each."""
    headers, frames, held = [], [], []
    bus.client("spy").subscribe(rt.topics.ingest(shard), lambda t, p: (headers.append(P.decode_frame(p)[0]),
                                                                        frames.append(p)))
    add = rt.shards.forwards.add

    def add_and_measure(shard, header, body):
        try:
            return add(shard, header, body)
        finally:
            held.append(sum(h["bytes"] for h in rt.shards.forwards._held.values()))
    rt.shards.forwards.add = add_and_measure
    return headers, frames, held


def test_a_worker_decompresses_no_more_than_the_device_may_send(tmp_path):
    """The coordinator tells a device's worker its decoded bound at registration (and with each verdict): a
    transfer past it goes on as sent (the coordinator then holds what the device sent, as without workers, and
    refuses it from its stated size); so does one of a device whose bound the worker has not heard. An honest
    upload is still decompressed by the worker."""
    bus, rt, workers, downs = cluster(tmp_path, "num_classes=10", "input_shape=[1,28,28]", register=())
    rt.register("devA", {"num_classes": 10, "feature_channels": 16, "train_samples": 1})
    settle(rt, workers)
    worker = workers[SHARD["devA"]]
    assert worker.decoded_limits == {"devA": rt.shards.device_limit("devA")}
    frames = oversized_upload(rt, "devA")
    headers, _, held = spy_on_forwards(bus, rt, SHARD["devA"])
    for frame in frames:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert headers[0]["packed"] == "zstd" and max(held) <= sum(map(len, frames))
    assert [a["reason"] for a in acks(downs, "devA")] == ["oversized"]
    ok = upload_frames("devA", [0], shape=rt.strategy.server.feature_shape)
    for frame in ok:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert headers[-1]["packed"] == "raw" and [a["accepted"] for a in acks(downs, "devA")] == [False, True]
    worker.decoded_limits.clear()   # a restarted worker: nothing decompressed until the next verdict says
    for frame in upload_frames("devA", [0], shape=rt.strategy.server.feature_shape, seed=1):
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert headers[-1]["packed"] == "zstd" and [a["accepted"] for a in acks(downs, "devA")] == [False, True, True]
    assert worker.decoded_limits == {"devA": rt.shards.device_limit("devA")}


def test_a_forward_stating_more_than_the_device_may_send_is_refused_from_its_first_part(tmp_path):
    """A worker whose bound for the device is out of date (or one that ignores it) decompresses what inflates
    at most MAX_FORWARD_INFLATION times; the coordinator must not then hold what the device's registration
    would refuse: part 0 is judged 'oversized', none of the parts is held, the verdict reaches the device and
    the worker, and the bytes are charged as without workers. A stray late part of it does not reopen it."""
    bus, rt, workers, downs = cluster(tmp_path, "num_classes=10", "input_shape=[1,28,28]", register=())
    rt.register("devA", {"num_classes": 10, "feature_channels": 16, "train_samples": 1})
    settle(rt, workers)
    workers[SHARD["devA"]].decoded_limits["devA"] = 1 << 30
    frames = oversized_upload(rt, "devA")
    parts, raw_parts, held = spy_on_forwards(bus, rt, SHARD["devA"])
    for frame in frames:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert parts[0]["packed"] == "raw" and len(parts) > 1          # the worker did decompress it
    assert len(held) == len(parts) and max(held) == 0 and not rt.shards.forwards._held
    assert rt.registry.devices["devA"]["rejection_reasons"] == {"oversized": 1}
    assert [a["reason"] for a in acks(downs, "devA")] == ["oversized"]
    transfer = P.decode_frame(frames[0])[0]["transfer"]
    assert workers[SHARD["devA"]].reassembler.progress("devA", transfer)["accepted"] is False
    assert rt.ingest.round_bytes["rejected"]["devA"] == sum(map(len, frames)) and rt.shards.forwarded == 1
    ok = upload_frames("devA", [0], shape=rt.strategy.server.feature_shape)   # the worker's next transfer
    for frame in ok:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert [(a["accepted"], a["reason"]) for a in acks(downs, "devA")] == [(False, "oversized"), (True, None)]
    rt.handle(rt.topics.ingest(SHARD["devA"]), raw_parts[1])   # a stray late part of the refused forward
    settle(rt, workers)
    progress = workers[SHARD["devA"]].reassembler.progress("devA", transfer)
    assert progress["final"] and progress["accepted"] is False and progress["reason"] == "oversized"
    worker = workers[SHARD["devA"]]       # the worker restarts (it knows no bound now) and the device re-sends:
    worker.decoded_limits.clear()         # forwarded as sent, the refused transfer is judged again, not lost
    worker.reassembler.reopen("devA", transfer)
    for frame in frames:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert [a["reason"] for a in acks(downs, "devA")] == ["oversized", None, "oversized"]
    assert not rt.shards.forwards._held and not worker.awaiting


def test_a_worker_is_told_no_bound_before_the_run_has_its_feature_shape(tmp_path):
    """Without the run's input shape configured, the first upload fixes the feature shape: until then a
    device's bound would allow any shape, so its worker is told none and forwards what it sends as it is."""
    bus, rt, workers, downs = cluster(tmp_path, register=("devA",))
    settle(rt, workers)
    assert rt.shards.device_limit("devA") is None and not any(w.decoded_limits for w in workers)
    for frame in upload_frames("devA", range(30)):
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert acks(downs, "devA")[0]["accepted"]   # the verdict carries the bound, now that the shape is known
    assert workers[SHARD["devA"]].decoded_limits == {"devA": rt.shards.device_limit("devA")} != {"devA": None}


def test_a_part_lost_on_the_way_makes_the_worker_reassemble_the_resend(tmp_path):
    """A broker that drops one forward part: the coordinator drops the transfer and tells the worker to retry,
    so the device's resend (after asking) is reassembled afresh and accepted, not counted as a copy."""
    bus, rt, workers, downs = cluster(tmp_path, "validation.max_samples_per_device=100000", register=())
    rt.register("devA", {"num_classes": 10, "feature_channels": 4, "train_samples": 6000})
    frames = upload_frames("devA", range(6000), shape=(4, 8, 8))
    worker = workers[SHARD["devA"]]
    real_publish, dropped = worker.transport.publish, []

    def lossy(topic, payload, **kw):
        if topic == rt.topics.ingest(SHARD["devA"]) and P.decode_frame(payload)[0].get("part") == 1 and not dropped:
            dropped.append(1)
            return
        real_publish(topic, payload, **kw)
    worker.transport.publish = lossy
    for frame in frames:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert dropped and "devA" not in rt.strategy.train_uploads and not acks(downs, "devA")
    header, body = P.decode_frame(frames[-1])
    bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), P.encode_frame({**header, "ack": 1}, body))
    settle(rt, workers)
    answer = [h["data"] for h in downs["devA"] if h["type"] == P.ACK][-1]
    assert answer["final"] is False and answer["missing"]    # reassembled afresh: the sender sends what is missing
    for frame in frames:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert len(rt.strategy.train_uploads["devA"].sample_ids) == 6000 and acks(downs, "devA")[0]["accepted"]


def test_a_device_quarantined_while_uploading_gets_in_once_released_charged_as_without_workers(tmp_path):
    import time
    bus, rt, workers, downs = cluster(tmp_path)
    for _ in range(5):
        rt.registry.reject("bad_header", "devA", "test")
    assert rt.registry.quarantined("devA")
    frames = upload_frames("devA", range(30))
    for frame in frames:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert rt.ingest.round_bytes["rejected"]["devA"] == sum(map(len, frames)) and not acks(downs, "devA")
    bad = P.encode_frame({**P.decode_frame(frames[0])[0], "crc32": 0}, P.decode_frame(frames[0])[1])
    bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), bad)
    worker = workers[SHARD["devA"]]
    assert "devA" in worker.quarantined  # told at the refused forward: from now on its chunks are not read
    settle(rt, workers)
    worker._charge_bulk(force=True)
    settle(rt, workers)
    assert rt.registry.devices["devA"]["rejection_reasons"].get("bad_checksum") is None   # "quarantined" instead
    assert rt.ingest.round_bytes["rejected"]["devA"] == sum(map(len, frames)) + len(bad)
    rt.registry.devices["devA"]["quarantined_until"] = time.time() - 1   # the quarantine ends, here and there
    worker.quarantined["devA"] = time.monotonic() - 1
    for frame in frames:   # the sender sends again
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert "devA" in rt.strategy.train_uploads and acks(downs, "devA")[0]["accepted"]


def test_frames_of_a_worker_with_another_config_are_ignored_not_charged_to_devices(tmp_path, caplog):
    from cloud_runtime.config import load_runtime_config
    bus, rt, workers, downs = cluster(tmp_path)
    stray = IngestWorker(load_runtime_config(None, [f"run_id={RUN}", "ingest.workers=3"]), bus.client("stray"), 0)
    start(stray)
    frames = upload_frames("devB", range(30))
    for frame in frames:   # devB's shard of 3 is not 0: the stray refuses it as wrong_shard
        bus.client("devB").publish(rt.topics.up("devB", 0), frame)
    settle(rt, workers + [stray])
    assert not rt.registry.devices["devB"]["rejected"] and "with 3 workers" in caplog.text
    assert rt.shards.worker_status[0]["state"] == "misconfigured"   # the stray said so last: not counted as serving shard 0
    assert "devB" in rt.strategy.train_uploads   # the right worker (shard 0 of 2) took it


def test_a_forward_whose_last_part_is_lost_is_reopened_after_the_transfer_timeout(tmp_path):
    bus, rt, workers, downs = cluster(tmp_path)
    worker = workers[SHARD["devA"]]
    worker.transport.publish, real = (lambda topic, payload, **kw: None
                                      if topic == rt.topics.ingest(SHARD["devA"]) else real(topic, payload, **kw)), \
        worker.transport.publish
    frames = upload_frames("devA", range(30))
    for frame in frames:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    transfer = P.decode_frame(frames[0])[0]["transfer"]
    assert worker.reassembler.progress("devA", transfer) is None       # being judged: the sender gets no answer
    assert worker.reopen_unjudged() == 0
    import time
    assert worker.reopen_unjudged(time.monotonic() + rt.cfg.transfer_timeout_s + 1) == 1
    assert worker.reassembler.progress("devA", transfer)["final"] is False   # the sender is told to send it again
    worker.transport.publish = real
    for frame in frames:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert "devA" in rt.strategy.train_uploads and acks(downs, "devA")[0]["accepted"] and not worker.awaiting


def test_provision_gives_each_worker_an_account_and_keeps_them_on_a_rerun(tmp_path):
    import yaml
    from cloud_runtime.provision import provision
    first = provision(tmp_path / "d", ["dev0"], host="127.0.0.1", broker_user="root", ingest_workers=2)
    ingest = yaml.safe_load(first.runtime_config.read_text())["ingest"]
    assert ingest["workers"] == 2 and len(set(ingest["passwords"])) == 2
    again = provision(tmp_path / "d", ["dev0"], host="127.0.0.1", broker_user="root")   # no flag: as before
    assert yaml.safe_load(again.runtime_config.read_text())["ingest"]["passwords"] == ingest["passwords"]
    more = provision(tmp_path / "d", ["dev0"], host="127.0.0.1", broker_user="root", ingest_workers=3)
    assert yaml.safe_load(more.runtime_config.read_text())["ingest"]["passwords"][:2] == ingest["passwords"]
    users = [line.split(":")[0] for line in (tmp_path / "d" / "broker" / "passwd").read_text().splitlines()]
    assert users == ["cloud-runtime", "cloud-runtime-ingest-0", "cloud-runtime-ingest-1", "cloud-runtime-ingest-2",
                     "dev0"]
    with pytest.raises(ValueError, match="reserved"):
        provision(tmp_path / "d", ["cloud-runtime-ingest-7"], host="127.0.0.1", broker_user="root")


def test_provision_keeps_a_worker_count_the_operator_set_by_hand(tmp_path):
    import yaml
    from cloud_runtime.provision import provision
    first = provision(tmp_path / "d", ["dev0"], host="127.0.0.1", broker_user="root")
    edited = yaml.safe_load(first.runtime_config.read_text())
    edited["ingest"]["workers"] = 3
    first.runtime_config.write_text(yaml.safe_dump(edited))
    again = provision(tmp_path / "d", ["dev0", "dev1"], host="127.0.0.1", broker_user="root")
    ingest = yaml.safe_load(again.runtime_config.read_text())["ingest"]
    assert ingest["workers"] == 3 and len(set(ingest["passwords"])) == 3   # with the accounts the count needs
    users = [line.split(":")[0] for line in (tmp_path / "d" / "broker" / "passwd").read_text().splitlines()]
    assert [u for u in users if "ingest" in u] == [f"cloud-runtime-ingest-{k}" for k in range(3)]


def test_workers_without_accounts_on_a_provisioned_broker_are_refused_with_the_remedy(tmp_path):
    from cloud_runtime.config import load_runtime_config
    with pytest.raises(ConfigError, match="provision --ingest-workers 2"):
        load_runtime_config(None, ["broker.username=cloud-runtime", "ingest.workers=2"])
    with pytest.raises(ConfigError, match="provision --ingest-workers 3"):
        load_runtime_config(None, ["broker.username=cloud-runtime", "ingest.workers=3", "ingest.passwords=[a, b]"])
    with pytest.raises(ConfigError, match="provision --ingest-workers 2"):   # lowered by hand: the ACL's shards
        load_runtime_config(None, ["broker.username=cloud-runtime", "ingest.workers=2",  # are those of 4
                                   "ingest.passwords=[a, b, c, d]"])
    load_runtime_config(None, ["broker.username=ops", "ingest.workers=2"])  # a broker that keeps client ids


def test_a_quarantined_flood_costs_the_worker_no_decoding_and_the_coordinator_one_event_a_second(tmp_path):
    bus, rt, workers, downs = cluster(tmp_path)
    worker = workers[SHARD["devA"]]
    events = []
    bus.client("probe").subscribe(rt.topics.ingest(SHARD["devA"]), lambda t, p: events.append(P.decode_frame(p)[0]))
    frame = upload_frames("devA", range(30))[0]
    header, body = P.decode_frame(frame)
    bad = P.encode_frame({**header, "crc32": 0}, body)
    for _ in range(rt.cfg.validation.quarantine_after):  # each refused by the worker, charged by the coordinator
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), bad)
        settle(rt, workers)
    assert rt.registry.quarantined("devA") and "devA" in worker.quarantined
    before, rejections = len(events), rt.registry.devices["devA"]["rejected"]
    for _ in range(500):
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), bad)
    settle(rt, workers)
    worker._charge_bulk(force=True)
    settle(rt, workers)
    assert len(events) - before == 1     # one bulk charge, not 500 events
    assert events[-1]["reason"] == "quarantined" and events[-1]["wire"] == 500 * len(bad)
    assert rt.registry.devices["devA"]["rejected"] == rejections + 1
    assert rt.ingest.round_bytes["rejected"]["devA"] == (rt.cfg.validation.quarantine_after + 500) * len(bad)
    # a verdict cannot silence a device for good: quarantines over a week (or not a number) are ignored
    worker.quarantined.clear()
    for left in (10 ** 9, "300", -5, float("nan")):
        worker._on_verdict(P.encode_frame({"type": P.VERDICT, "run": RUN, "device": "devB", "round": -1,
                                           "quarantined_for_s": left}))
    assert not worker.quarantined


def test_chunks_left_on_an_old_shard_after_the_worker_count_changed_never_quarantine_an_honest_device(tmp_path):
    # the operator went from 2 workers to 3: devB's chunks queued for its old shard reach a worker whose shard it
    # no longer is. They are charged in bulk, and are no offence (before: 5 in a row quarantined it for 300 s)
    bus, rt, workers, downs = cluster(tmp_path)
    frames = upload_frames("devB", range(30))
    for _ in range(4):
        for frame in frames:
            bus.client("devB").publish(rt.topics.up("devB", 1 - SHARD["devB"]), frame)
        settle(rt, workers)
        for w in workers:
            w._charge_bulk(force=True)
        settle(rt, workers)
    assert not rt.registry.quarantined("devB")
    assert rt.registry.devices["devB"]["rejection_reasons"] == {"wrong_shard": 4}
    assert rt.ingest.round_bytes["rejected"]["devB"] == 4 * sum(map(len, frames))
    for frame in frames:   # the sender re-sends on its shard: accepted
        bus.client("devB").publish(rt.topics.up("devB", SHARD["devB"]), frame)
    settle(rt, workers)
    assert "devB" in rt.strategy.train_uploads and acks(downs, "devB")[0]["accepted"]


def test_a_worker_that_counted_a_quarantine_from_a_late_verdict_is_told_the_device_is_free(tmp_path):
    # a quarantine verdict read late (queued while the worker restarted) would silence a released device for the
    # whole quarantine again: the coordinator answers its bulk "quarantined" charge with a release
    bus, rt, workers, downs = cluster(tmp_path)
    worker = workers[SHARD["devA"]]
    worker._on_verdict(P.encode_frame({"type": P.VERDICT, "run": RUN, "device": "devA", "round": -1,
                                       "quarantined_for_s": 300}))
    assert "devA" in worker.quarantined and not rt.registry.quarantined("devA")
    frames = upload_frames("devA", range(30))
    for frame in frames:
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    worker._charge_bulk(force=True)
    settle(rt, workers)
    assert "devA" not in worker.quarantined   # released
    for frame in frames:   # the sender re-sends: accepted
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
    settle(rt, workers)
    assert "devA" in rt.strategy.train_uploads and acks(downs, "devA")[0]["accepted"]
    assert not rt.registry.quarantined("devA")


def test_a_refusal_charged_by_a_worker_that_does_not_know_of_a_quarantine_is_charged_as_quarantined(tmp_path):
    bus, rt, workers, downs = cluster(tmp_path)
    for _ in range(rt.cfg.validation.quarantine_after):
        rt.registry.reject("bad_header", "devA", "test")   # quarantined here; its worker not told yet
    header, body = P.decode_frame(upload_frames("devA", range(30))[0])
    bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), P.encode_frame({**header, "crc32": 0}, body))
    settle(rt, workers)
    reasons = rt.registry.devices["devA"]["rejection_reasons"]
    assert reasons.get("bad_checksum") is None and reasons["quarantined"] == 1   # as without workers


def test_a_backlog_that_refills_as_fast_as_it_is_handled_ends_a_drain_within_its_budget():
    """drain returns once its budget is spent even while messages keep coming, so what its caller does between
    drains (deadlines, transfer expiry, a worker's presence renewal) is never starved by a flood."""
    from edgefl_core.transport.inbox import Inbox
    inbox, now = Inbox(), [0.0]

    def handle(topic, payload):   # each message takes 0.1 s and another arrives meanwhile: never empty
        now[0] += 0.1
        inbox.put(topic, payload)
    inbox.put("t", b"")
    assert drain(inbox, handle, 0, budget_s=0.5, clock=lambda: now[0]) == 5 and inbox.qsize() == 1
    calm = Inbox()
    for _ in range(3):
        calm.put("t", b"")
    assert drain(calm, lambda t, p: None, 0) == 3 and calm.empty()   # a backlog that ends: handled whole


def test_a_worker_flooded_without_pause_still_renews_its_presence(tmp_path, monkeypatch):
    """The runtime marks a worker stale when its presence is not renewed: a worker whose inbox never empties
    (a fleet uploading at once, one device flooding its shard) must renew it all the same."""
    import threading
    import time
    import cloud_runtime.ingest_worker as W
    monkeypatch.setattr(W, "PRESENCE_EVERY_S", 0.2)
    bus, rt, workers, downs = cluster(tmp_path)
    worker = workers[0]
    renewals, handle, flood_until = [], worker.handle, time.monotonic() + 2.5
    say_online = worker._say_online

    def counted_say_online():
        renewals.append(time.monotonic())
        say_online()

    def handle_and_refill(topic, payload):   # a junk frame on a device's topic: refused, and another queued
        handle(topic, payload)
        if time.monotonic() < flood_until:
            worker.inbox.put(topic, payload)
    worker._say_online, worker.handle = counted_say_online, handle_and_refill
    worker.inbox.put(rt.topics.up("devB", 0), b"junk")
    serving = threading.Thread(target=worker.serve, daemon=True)
    serving.start()
    time.sleep(3.0)
    worker.stop.set()
    serving.join(5)
    assert len([t for t in renewals if t < flood_until]) >= 2, renewals


def test_forwards_count_toward_their_device_s_bound_at_a_busy_coordinator(tmp_path):
    """What a worker forwards (decompressed, up to the device's decoded limit) reaches the coordinator on its own
    topic: it counts toward the device's bound there as its chunks would without workers, so a device sending
    transfer after transfer while the coordinator trains cannot fill its memory through its worker. And a
    worker bounds what it queues per device too, charging what it drops to the device."""
    bus, rt, workers, downs = cluster(tmp_path, "max_chunk_bytes=262144", "max_pending_bytes_per_device=1048576",
                                      "validation.quarantine_after=100000", register=("devA", "devB"))
    settle(rt, workers)
    worker = workers[SHARD["devA"]]
    for k in range(40):                     # 40 transfers of ~100 kB while the coordinator handles nothing
        for frame in P.chunk_transfer(np.random.default_rng(k).bytes(100_000), run=RUN, device="devA", round_=0,
                                      meta={"kind": "upload", "split": "train", "codec": "fp16"}):
            bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), frame)
        drain(worker.inbox, worker.handle, 0.01)
    assert worker.forwarded == 40 and rt.inbox.qsize() <= 11
    settle(rt, workers)
    worker._charge_bulk(force=True)
    settle(rt, workers)
    assert rt.registry.devices["devA"]["rejection_reasons"]["inbox_full"] >= 1
    for _ in range(3000):                   # the worker's own inbox: bounded per device the same way
        bus.client("devA").publish(rt.topics.up("devA", SHARD["devA"]), b"junk")
    assert worker.inbox.qsize() == 1048576 // (4 + 512)
    drain(worker.inbox, worker.handle, 0.01)
    worker.between_drains()
    worker._charge_bulk(force=True)
    settle(rt, workers)
    assert rt.registry.devices["devA"]["rejection_reasons"]["inbox_full"] >= 2, rt.registry.devices["devA"]["rejection_reasons"]
