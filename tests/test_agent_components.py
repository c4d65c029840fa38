"""Regressions found when the agent was split into components (issue 12): what the old agent dropped with a
warning must still be dropped (never an internal error), and a damaged state file never stops a start."""
import json
import threading
import time

import numpy as np

from edge_sdk import wire as P
from edge_sdk.agent import build_agent
from edge_sdk.config import AgentConfig
from edge_sdk.state import STATE_FILE, read_state_meta
from edgefl_core.data.config import AgentDataConfig
from edgefl_core.transport.memory import MemoryBus

RUN = "split"
RECIPE = {"algorithm": "fedgkt", "edge": {"model": "resnet8_gkt"}, "codec": "int8", "model_codec": "fp16"}


def _agent(npz_dir, tmp_path):
    agent = build_agent(AgentConfig(device_id="devA", run_id=RUN, data=AgentDataConfig("npz", str(npz_dir)),
                                    state_dir=str(tmp_path / "s")), transport=MemoryBus().client("devA"))
    agent.handle(P.Topics(RUN).control, P.control_frame(P.HELLO, run=RUN, device="*", round_=0, session="s1",
                                                        recipe=RECIPE))
    assert agent.client is not None
    return agent


def _send(agent, arrays: dict, kind: str) -> None:
    for frame in P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device="devA", round_=0, meta={"kind": kind}):
        agent.handle(P.Topics(RUN).down("devA"), frame)


def test_soft_labels_the_device_cannot_use_are_dropped_not_internal_errors(npz_dir, tmp_path):
    agent = _agent(npz_dir, tmp_path)
    k = agent.train_set.num_classes
    unknown = np.array([10**9, 10**9 + 1], dtype=np.int64)      # ids this device does not hold
    _send(agent, {"sample_ids": unknown, "logits": np.zeros((2, k), np.float32)}, P.KIND_SOFT_LABELS)
    mine = agent.train_set.sample_ids[:2].astype(np.int64)      # its ids, but another class count
    _send(agent, {"sample_ids": mine, "logits": np.zeros((2, k + 3), np.float32)}, P.KIND_SOFT_LABELS)
    assert agent.rejected == 2 and agent.internal_errors == 0
    assert agent.progress.soft_label_round == -1  # nothing applied


def test_a_state_file_with_odd_metadata_does_not_stop_the_agent(npz_dir, tmp_path):
    state = tmp_path / "s" / STATE_FILE
    state.parent.mkdir(parents=True)
    for metadata in ({"agent": 5}, {"agent": "[" * 100_000 + "]" * 100_000}, {"agent": "[]"}):
        header = json.dumps({"__metadata__": metadata}).encode()
        state.write_bytes(len(header).to_bytes(8, "little") + header)
        assert read_state_meta(state) is None
        agent = _agent(npz_dir, tmp_path)
        assert agent.progress.done_session is None and agent.internal_errors == 0


def test_an_agent_kept_busy_by_a_stream_of_messages_still_heartbeats(npz_dir, tmp_path):
    """The serve loop went back to its inbox whenever a drain had handled something, before its heartbeat: a
    steady stream of messages (here malformed frames, each dropped) held every heartbeat back, and the runtime
    would have taken the device for gone."""
    bus = MemoryBus()
    agent = build_agent(AgentConfig(device_id="devA", run_id=RUN, data=AgentDataConfig("npz", str(npz_dir)),
                                    state_dir=str(tmp_path / "s"), heartbeat_s=0.2), transport=bus.client("devA"))
    agent.handle(P.Topics(RUN).control, P.control_frame(P.HELLO, run=RUN, device="*", round_=0, session="s1",
                                                        recipe=RECIPE))
    beats = []
    bus.client("watch").subscribe(P.Topics(RUN).heartbeat("devA"), lambda topic, payload: beats.append(payload))
    feeding = threading.Event()

    def feed():
        while not feeding.is_set():
            agent.inbox.put(P.Topics(RUN).down("devA"), b"not a frame")
            time.sleep(0.001)
    feeder, server = threading.Thread(target=feed), threading.Thread(target=agent.serve)
    feeder.start()
    server.start()
    time.sleep(2.0)
    feeding.set()
    feeder.join()
    agent.stop.set()
    server.join(10)
    assert agent.rejected > 100 and agent.internal_errors == 0  # the stream was handled all along
    assert len(beats) >= 4, f"{len(beats)} heartbeats in 2 s at a 0.2 s period"
