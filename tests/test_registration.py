"""A device's first registration is processed (and logged) once, even when the broker delivers late a
registration the agent made for the previous runtime session; a real re-registration still says so."""
import logging

from cloud_runtime.config import load_runtime_config
from cloud_runtime.service import CloudRuntime
from edge_sdk import protocol as P
from edge_sdk.agent import build_agent
from edge_sdk.config import AgentConfig
from edgefl_core.data.config import AgentDataConfig
from edgefl_core.transport import MemoryBus

RUN = "reg"
RECIPE = {"algorithm": "fedgkt", "edge": {"model": "resnet8_gkt"}, "codec": "int8", "model_codec": "fp16"}


def registrations(caplog) -> list[str]:
    return [r.getMessage().split(":")[0] for r in caplog.records
            if r.name == "edgefl.runtime" and "registered:" in r.getMessage()]


def test_a_late_registration_for_the_previous_session_is_ignored(npz_dir, tmp_path, caplog):
    """What a normal start did: an agent that started while no runtime ran registered for the previous
    runtime's retained announcement; the broker held that registration for the runtime's persistent session
    and delivered it when the new runtime connected, just before the agent registered for the new session.
    The runtime logged "devA registered", then "devA re-registered", in the same second."""
    caplog.set_level(logging.INFO)
    bus = MemoryBus()
    topics = P.Topics(RUN)
    bus.client("old-runtime").publish(topics.control, P.control_frame(
        P.HELLO, run=RUN, device="*", round_=0, session="old-session", recipe=RECIPE), retain=True)
    held = []  # what the broker keeps for the runtime's persistent session while no runtime is connected
    bus.client("broker-queue").subscribe(topics.all_up, lambda topic, payload: held.append((topic, payload)))

    def agent():
        a = build_agent(AgentConfig(device_id="devA", run_id=RUN, data=AgentDataConfig("npz", str(npz_dir)),
                                    state_dir=str(tmp_path / "agent")), transport=bus.client("devA"))
        a.start()
        a.pump(0.05)
        return a

    first = agent()
    assert first.registered_session == "old-session" and len(held) == 1
    assert P.decode_frame(held[0][1])[0]["data"]["session"] == "old-session"  # the agent names the session
    # ... and it ran that session's round: its upload and a heartbeat were held as well
    held += [(topics.up("devA"), frame) for frame in P.chunk_transfer(
        b"x" * 3000, run=RUN, device="devA", round_=0, meta={"kind": P.KIND_UPLOAD}, max_chunk=1000)]
    held.append((topics.heartbeat("devA"), P.control_frame(P.HEARTBEAT, run=RUN, device="devA", round_=0)))

    cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={tmp_path / 'rt'}", "rounds=1"])
    rt = CloudRuntime(cfg, bus.client("runtime"))
    rt.start()                       # its hello (a new session) is retained on the control topic
    for topic, payload in held:      # the broker delivers the held registration at connect
        rt.handle(topic, payload)
    assert "devA" not in rt.registry.devices and not rt.registry.rejections  # ignored, not charged
    assert rt.late_messages == 1 + 3 + 1
    assert rt.strategy.num_classes is None  # nor did the late registration fix the run's facts
    first.pump(0.05)                 # the agent sees the new session and registers for it
    rt.pump(0.05)
    assert first.registered_session == rt.session
    assert registrations(caplog) == ["devA registered"]
    assert rt.registry.devices["devA"]["online"] and not rt.registry.rejections

    caplog.clear()  # a real re-registration: the agent restarts and registers for the current session again
    first.transport.close()
    agent()
    rt.pump(0.05)
    assert registrations(caplog) == ["devA re-registered"]


def test_a_registration_naming_a_malformed_session_is_rejected(tmp_path):
    cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={tmp_path / 'rt'}", "rounds=1"])
    rt = CloudRuntime(cfg, MemoryBus().client("runtime"))
    data = {"num_classes": 4, "feature_channels": 16, "train_samples": 10}
    rt.handle(rt.topics.up("devA"), P.control_frame(P.REGISTER, run=RUN, device="devA", round_=-1, session=7, **data))
    assert rt.registry.rejections["bad_registration"] == 1 and "devA" not in rt.registry.devices
    rt.handle(rt.topics.up("devA"), P.control_frame(P.REGISTER, run=RUN, device="devA", round_=-1, **data))
    assert "devA" in rt.registry.devices  # an agent that names no session (older agents) registers as before
