"""Round logic of the cloud runtime, driven in process through the in-memory transport twin."""
import numpy as np
import torch

from cloud_runtime.config import load_runtime_config
from cloud_runtime.service import CloudRuntime
from edge_sdk import protocol as P
from edge_sdk.messages import FeatureUpload
from edgefl_core.transport import MemoryBus


def make_runtime(tmp_path, *overrides):
    cfg = load_runtime_config(None, ["run_id=r", f"state_dir={tmp_path}", "server.batch_size=8", *overrides])
    runtime = CloudRuntime(cfg, MemoryBus().client("runtime"))
    for device in ("devA", "devB"):
        runtime.register(device, {"num_classes": 4, "feature_channels": 16, "train_samples": 8})
    return runtime


def upload(device, round_, seed):
    g = torch.Generator().manual_seed(seed)
    ids = np.arange(seed * 100, seed * 100 + 8, dtype=np.int64)
    return FeatureUpload(device, round_, "train", ids, torch.rand(8, 16, 4, 4, generator=g), torch.randn(8, 4, generator=g),
                         torch.randint(0, 4, (8,), generator=g))


def test_features_of_a_device_that_stopped_uploading_age_out(tmp_path):
    runtime = make_runtime(tmp_path, "max_staleness=2")
    runtime.strategy.train_uploads = {"devA": upload("devA", 0, 1), "devB": upload("devB", 0, 2)}
    runtime.strategy.train_and_answer(0, ["devA", "devB"])
    assert set(runtime.strategy.server.train_store) == {"devA", "devB"}
    for round_ in (1, 2, 3):  # devB went silent after round 0
        runtime.strategy.train_uploads = {"devA": upload("devA", round_, 1)}
        runtime.strategy.train_and_answer(round_, ["devA"])
    assert set(runtime.strategy.server.train_store) == {"devA"}


def test_soft_labels_go_only_to_participants_and_carry_their_ids(tmp_path):
    runtime = make_runtime(tmp_path)
    got = {}
    bus = runtime.transport.bus
    for device in ("devA", "devB"):
        reassembler = P.Reassembler()

        def on_down(topic, payload, device=device, reassembler=reassembler):
            header, body = P.decode_frame(payload)
            if header["type"] == P.CHUNK:
                done = reassembler.add(header, body)
                if done is not None:
                    got[device] = P.arrays_to_soft_labels(P.unpack_arrays(done.blob), device, done.round)
        bus.client(f"listener-{device}").subscribe(runtime.topics.down(device), on_down)
    runtime.strategy.train_uploads = {"devA": upload("devA", 0, 1), "devB": upload("devB", 0, 2)}
    runtime.strategy.train_and_answer(0, ["devA"])
    assert set(got) == {"devA"}
    assert (got["devA"].sample_ids == upload("devA", 0, 1).sample_ids).all()


class _Evil:
    def __reduce__(self):
        import os
        return (os.system, ("touch pwned-by-checkpoint",))


def test_a_tampered_checkpoint_is_refused_never_executed(tmp_path, monkeypatch):
    import json
    import pickle

    import pytest
    monkeypatch.chdir(tmp_path)
    state = tmp_path / "state"
    state.mkdir()
    (state / "server.1.pt").write_bytes(pickle.dumps({"model": _Evil()}))
    (state / "runtime.json").write_text(json.dumps({"generation": 1, "server_checkpoint": "server.1.pt",
                                                    "next_round": 1, "rows": [], "devices": {},
                                                    "num_classes": 4, "feature_channels": 16}))
    cfg = load_runtime_config(None, ["run_id=r", f"state_dir={state}"])
    runtime = CloudRuntime(cfg, MemoryBus().client("runtime"))
    from cloud_runtime.store import CheckpointError
    with pytest.raises(CheckpointError, match="server.1.pt: UnpicklingError"):
        runtime.restore()  # torch.load(weights_only=True) refuses the os.system global; the error names the file
    assert not (tmp_path / "pwned-by-checkpoint").exists()


def test_an_overlapped_evaluation_finishes_on_stop_and_a_lost_one_is_named_on_restore(tmp_path):
    from cloud_runtime.strategies.fedgkt import OVERLAPPED
    runtime = make_runtime(tmp_path)
    strategy = runtime.strategy
    strategy.train_uploads = {"devA": upload("devA", 0, 1), "devB": upload("devB", 0, 2)}
    strategy.train_and_answer(0, ["devA", "devB"])
    test = upload("devA", 0, 3)
    test.split = "test"
    strategy.test_uploads = {"devA": test}
    row = {"round": 0}
    runtime.stop.set()                      # Ctrl-C while devices train the next round
    pending = strategy.start_evaluation(row)
    strategy.finish_evaluation(pending)     # what run()'s finally does: the round keeps its accuracy
    assert row["test_accuracy"] is not None and "evaluation" not in row
    strategy.restore({"next_round": 1, "rows": [{"round": 0, "test_accuracy": None, "evaluation": OVERLAPPED}]})
    assert strategy.rows[0]["evaluation"].startswith("lost: ")   # killed before it finished: said so, not pending


def test_a_stop_waits_for_a_serial_evaluation_and_a_report_needs_no_checkpoint_first(tmp_path):
    runtime = make_runtime(tmp_path / "never-checkpointed", "fedgkt.overlap_evaluation=false")
    strategy = runtime.strategy
    strategy.train_uploads = {"devA": upload("devA", 0, 1)}
    strategy.train_and_answer(0, ["devA"])
    test = upload("devA", 0, 3)
    test.split = "test"
    strategy.test_uploads = {"devA": test}
    runtime.stop.set()                  # Ctrl-C as the trained round evaluates: the round is not thrown away
    row = {"round": 0}
    strategy.evaluate(row)
    assert row["test_accuracy"] is not None
    runtime.write_report()              # a stop before the first checkpoint: the state dir is made, not an ERROR
    assert (tmp_path / "never-checkpointed" / "report.json").exists()


def test_a_round_closing_at_its_deadline_judges_the_uploads_already_queued_first(tmp_path):
    """A drain stops after its time budget (a backlog must not starve deadlines), but a round that reaches its
    deadline with a quorum closes only once what was queued is judged: uploads that arrived on time are in the
    round, never rejected as stale_round in the next one (which would count toward quarantine)."""
    import time
    from test_trust_boundary import runtime, upload_frames
    devices = ["devA", "devB", "devC", "devD", "devE", "devF"]
    bus = MemoryBus()
    rt = runtime(tmp_path, bus, "round_deadline_s=0.001", register=devices)
    rt.start()
    rt.pump(0.01)
    handle = rt.handle

    def slow(topic, payload):   # each upload takes 0.2 s to judge: 6 of them are more than one drain's budget
        time.sleep(0.2)
        handle(topic, payload)
    rt.handle = slow
    for i, device in enumerate(devices):  # all queued before the round's deadline is looked at
        for frame in upload_frames(device, range(30 * i, 30 * i + 30)):
            bus.client(device).publish(rt.topics.up(device), frame)
    strategy = rt.strategy
    assert strategy.collect(0, lambda: set(strategy.train_uploads))
    assert sorted(strategy.train_uploads) == devices and rt.inbox.empty()
    assert not any(rt.registry.devices[d].get("rejection_reasons") for d in devices)


def test_a_device_flooding_heartbeats_cannot_hold_a_round_past_its_deadline(tmp_path):
    """Heartbeats are no offence, so a flood of valid ones is never quarantined: a round with a quorum still
    closes at its deadline once what arrived before the deadline is handled, though the inbox never empties."""
    import time
    from test_trust_boundary import runtime, upload_frames
    bus = MemoryBus()
    rt = runtime(tmp_path, bus, "round_deadline_s=1", "quorum=0.5", register=("devA", "devB"))
    rt.start()
    rt.pump(0.01)
    for frame in upload_frames("devB", range(30)):
        bus.client("devB").publish(rt.topics.up("devB"), frame)
    beat = P.control_frame(P.HEARTBEAT, run=rt.cfg.run_id, device="devA", round_=0)
    handle, flood_until = rt.handle, time.monotonic() + 8

    def flooded(topic, payload):   # every message handled brings two more heartbeats: the inbox never empties
        handle(topic, payload)
        if time.monotonic() < flood_until:
            for _ in range(2):
                rt.enqueue(rt.topics.heartbeat("devA"), beat)
    rt.handle = flooded
    rt.enqueue(rt.topics.heartbeat("devA"), beat)
    strategy, start = rt.strategy, time.monotonic()
    assert strategy.collect(0, lambda: set(strategy.train_uploads))
    assert time.monotonic() - start < 6 and not rt.inbox.empty() and sorted(strategy.train_uploads) == ["devB"]
    assert not rt.registry.devices["devA"].get("rejection_reasons")


def test_a_device_publishing_while_the_runtime_is_busy_cannot_fill_its_memory(tmp_path):
    """While the serve thread trains it handles nothing: each device's queued messages are bounded by
    max_pending_bytes_per_device (an empty message costs its overhead too), what is over is dropped unread and
    charged to that device (inbox_full: not an offence, an honest device re-sends what is missing), the bound
    is given back as messages are handled, and other devices' uploads are untouched."""
    from edgefl_core.transport.inbox import MESSAGE_OVERHEAD
    from test_trust_boundary import runtime, upload_frames
    bus = MemoryBus()
    rt = runtime(tmp_path, bus, "max_chunk_bytes=262144", "max_pending_bytes_per_device=1048576",
                 register=("devA", "devB"))
    rt.start()
    rt.pump(0.01)
    beat = P.control_frame(P.HEARTBEAT, run=rt.cfg.run_id, device="devA", round_=0)
    for _ in range(3000):                   # valid heartbeats (no offence), then empty messages: none is free
        bus.client("devA").publish(rt.topics.heartbeat("devA"), beat)
    for _ in range(3000):
        bus.client("devA").publish(rt.topics.up("devA"), b"")
    for frame in upload_frames("devB", range(30)):
        bus.client("devB").publish(rt.topics.up("devB"), frame)
    fit = 1048576 // (len(beat) + MESSAGE_OVERHEAD)
    assert rt.inbox.qsize() == fit + len(upload_frames("devB", range(30)))
    while not rt.inbox.empty():
        rt.pump(0.01)
    rt.pump(0.01)
    info = rt.registry.devices["devA"]
    assert info["rejection_reasons"] == {"inbox_full": 1} and rt.registry.offences["devA"] == 0
    assert not rt.registry.quarantined("devA")
    assert rt.ingest.round_bytes["rejected"]["devA"] == (3000 - fit) * len(beat)
    assert "devB" in rt.strategy.train_uploads and not rt.registry.devices["devB"].get("rejection_reasons")
    for frame in upload_frames("devA", range(30)):   # handled, its messages gave their bound back
        bus.client("devA").publish(rt.topics.up("devA"), frame)
    rt.pump(0.01)
    assert "devA" in rt.strategy.train_uploads
