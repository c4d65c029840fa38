"""Regression tests that make partial reverts of the trust-boundary fixes fail (found by reverting each fix in
turn: the first tests still passed with these parts reverted). Item numbers are the issue's."""
import errno
import struct

import numpy as np
import pytest
import torch

from cloud_runtime.config import load_runtime_config
from cloud_runtime.store import DurableStore
from edge_sdk import protocol as P
from edge_sdk.agent import build_agent
from edge_sdk.config import AgentConfig
from edge_sdk.messages import FeatureUpload
from edgefl_core.config import ConfigError
from edgefl_core.data.config import AgentDataConfig
from edgefl_core.data.datasets import DatasetError, load_npz
from edgefl_core.transport import MemoryBus

from test_trust_regressions import RUN, raw_frame, runtime  # the same helpers

GOOD_RECIPE = {"algorithm": "fedgkt", "edge": {"model": "resnet8_gkt"}, "codec": "int8", "model_codec": "fp16"}


# item 1: NaN / Infinity anywhere in a header (not only in typed fields)
@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", "1e999"])
def test_p1_non_finite_numbers_in_free_header_fields_are_a_named_rejection(tmp_path, value):
    rt = runtime(tmp_path)
    rt.handle(rt.topics.heartbeat("devA"), raw_frame(
        '{"v":1,"type":"heartbeat","run":"trust","device":"devA","round":0,"data":{"rss_mb":' + value + "}}"))
    assert rt.registry.rejections["bad_header"] == 1 and not rt.registry.rejections["internal_error"]
    assert "heartbeat" not in rt.registry.devices["devA"]


# item 2: the very first upload (nothing pinned yet) with other channels than the run registered
def test_p2_a_first_upload_with_other_channels_than_the_run_is_rejected(tmp_path):
    rt = runtime(tmp_path)
    g = torch.Generator().manual_seed(0)
    seven = FeatureUpload("devB", 0, "train", np.arange(30, dtype=np.int64), torch.rand(30, 7, 3, 3, generator=g),
                          torch.randn(30, 10, generator=g), torch.randint(0, 10, (30,), generator=g))
    arrays, meta = P.upload_to_arrays(seven, "fp16")
    for frame in P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device="devB", round_=0, meta=meta):
        rt.handle(rt.topics.up("devB"), frame)
    assert rt.registry.rejections["bad_shape"] == 1 and not rt.strategy.train_uploads
    assert rt.strategy.server.feature_shape is None  # nothing pinned by a rejected upload


# item 4: the MQTT transport's half (the in-process tests only use MemoryBus)
def test_p4_mqtt_transport_drops_and_clears_retained_messages_on_live_only_subscriptions():
    from edgefl_core.transport.mqtt import MqttTransport
    t = MqttTransport("mqtt://127.0.0.1:1883", "runtime")
    got, published = [], []
    t.subscribe("e/+/up", lambda topic, p: got.append((topic, p)), retained=False)
    t.subscribe("e/+/status", lambda topic, p: got.append((topic, p)))

    class Client:
        def publish(self, topic, payload, qos=0, retain=False):
            published.append((topic, payload, retain))

    class Msg:
        def __init__(self, topic, payload, retain):
            self.topic, self.payload, self.retain = topic, payload, retain

    t._on_message(Client(), None, Msg("e/x/up", b"register", True))
    assert got == [] and published == [("e/x/up", b"", True)] and t.cleared_retained == 1
    t._on_message(Client(), None, Msg("e/x/up", b"live", False))
    t._on_message(Client(), None, Msg("e/x/status", b"will", True))  # retained by design: handed over
    assert got == [("e/x/up", b"live"), ("e/x/status", b"will")] and len(published) == 1


# item 10: the catch-all must not hide a crash: every case is a named drop, never an internal error
@pytest.mark.parametrize("data", ["[1, 2]", '"text"', "null", '{"a":' * 40 + "1" + "}" * 40,
                                  '{"recipe": ' + "[" * 3000 + "]" * 3000 + "}", '{"session": 1e999}'])
@pytest.mark.parametrize("kind", ["hello", "round", "shutdown", "ack", "chunk"])
def test_p10_control_frames_of_any_shape_are_dropped_by_name(npz_dir, kind, data):
    agent = build_agent(AgentConfig(device_id="devA", run_id=RUN, data=AgentDataConfig("npz", str(npz_dir))),
                        transport=MemoryBus().client("devA"))
    control = P.Topics(RUN).control
    agent.handle(control, P.control_frame(P.HELLO, run=RUN, device="*", round_=0, session="s1", recipe=GOOD_RECIPE))
    assert agent.client is not None
    before = agent.rejected
    raw = ('{"v":1,"type":"' + kind + '","run":"trust","device":"*","round":0,"data":' + data + "}").encode()
    for topic in (control, P.Topics(RUN).down("devA")):
        agent.handle(topic, P.MAGIC + struct.pack(">I", len(raw)) + raw)
    assert agent.internal_errors == 0 and agent.rejected == before + 2 and not agent.stop.is_set()


def test_p10_a_round_frame_without_data_is_no_internal_error(npz_dir):
    agent = build_agent(AgentConfig(device_id="devA", run_id=RUN, data=AgentDataConfig("npz", str(npz_dir))),
                        transport=MemoryBus().client("devA"))
    control = P.Topics(RUN).control
    agent.handle(control, P.control_frame(P.HELLO, run=RUN, device="*", round_=0, session="s1", recipe=GOOD_RECIPE))
    agent.handle(control, raw_frame('{"v":1,"type":"round","run":"trust","device":"*","round":1}'))
    assert agent.internal_errors == 0 and not agent.stop.is_set()


# item 12: losses are recovered from the receiver's answers (selective repeat), not by timeouts
@pytest.mark.parametrize("capacity,rate", [(6, 1), (6, 3)])
def test_p12_drops_are_resent_from_the_answers_not_after_timeouts(capacity, rate):
    from test_reliable import LossyBroker, chunks_of, run_sender
    from edgefl_core.chunking import Reassembler
    from edgefl_core.reliable import TransferSender
    blob, chunks = chunks_of(2048 * 600)
    broker = LossyBroker(Reassembler(), capacity, rate)
    sender = TransferSender(chunks, broker.publish, window=16)
    verdict, _ = run_sender(sender, broker)
    assert verdict.accepted and broker.completed[0].blob == blob and broker.dropped > 0
    assert sender.timeouts == 0 and sender.resends <= 2 * broker.dropped


# item 14: an altered model file of the committed size (sha256, not only the size, is verified)
class Tiny(torch.nn.Module):
    def __init__(self, value):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((4,), float(value)))


def test_p14_a_checkpoint_altered_in_place_falls_back_to_the_last_good_generation(tmp_path):
    store = DurableStore(tmp_path)
    store.commit({"server": Tiny(1)}, {"next_round": 1})
    store.commit({"server": Tiny(2)}, {"next_round": 2})
    newest = tmp_path / "server.2.pt"
    data = bytearray(newest.read_bytes())
    at = data.find(struct.pack("<f", 2.0) * 4)
    assert at > 0
    data[at:at + 16] = struct.pack("<f", 1e30) * 4  # same size, other weights
    newest.write_bytes(bytes(data))
    again = DurableStore(tmp_path)
    assert again.load()["next_round"] == 1 and again.load_model("server")["w"][0] == 1
    assert any("server.2.pt" in s and "sha256" in s for s in again.skipped)


# item 14: a real file-size failure inside the process (RLIMIT_FSIZE: writes fail with EFBIG, as a full disk
# fails with ENOSPC) must be a status, whichever library does the writing
def test_p14_a_write_failure_from_the_os_is_a_status_not_a_crash(tmp_path):
    import resource
    import signal
    rt = runtime(tmp_path)
    rt.checkpoint()
    assert rt.store.generation == 1
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024, hard))
    try:
        rt.checkpoint()  # must not raise
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    assert rt.checkpoint_error is not None and rt.store.generation == 1
    assert DurableStore(tmp_path / "rt").load()["generation"] == 1


# item 14: a commit that fails half way leaves no files of the uncommitted generation behind
def test_p14_a_commit_failing_half_way_leaves_nothing_of_it(tmp_path, monkeypatch):
    import cloud_runtime.store as store_module
    rt = runtime(tmp_path)
    rt.checkpoint()
    real, calls = store_module._write_atomic, [0]

    def second_write_fails(path, data):
        calls[0] += 1
        if calls[0] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, data)
    monkeypatch.setattr(store_module, "_write_atomic", second_write_fails)
    rt.checkpoint()
    assert rt.checkpoint_error is not None
    assert not [p.name for p in (tmp_path / "rt").iterdir() if ".2." in p.name]


# item 15: images too small for the models are refused at config load (no registered model is too small for
# any image size at batch 2, so the test registers one that needs at least 9x9 pixels)
def test_p15_images_too_small_for_the_models_are_refused_at_config_load(monkeypatch):
    from model_zoo import _registry

    def needs_9px(num_classes=10, in_channels=3):
        return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 4, 5), torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 5),
                                   torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, num_classes))
    monkeypatch.setitem(_registry._MODEL_FNS, "needs_9px", needs_9px)
    base = ["num_classes=10", "algorithm=fedavg", "edge.model=needs_9px"]
    load_runtime_config(None, [*base, "input_shape=[1, 12, 12]"])
    with pytest.raises(ConfigError, match="8x8 are too small.*smallest square size that works is 12x12"):
        load_runtime_config(None, [*base, "input_shape=[1, 8, 8]"])


# item 16: ambiguous layouts are refused, not guessed
def test_p16_an_ambiguous_layout_is_refused(tmp_path):
    np.savez(tmp_path / "amb.npz", images=np.zeros((5, 3, 8, 4), np.uint8), labels=np.zeros(5, np.int64))
    with pytest.raises(DatasetError, match="amb.npz.*could be"):
        load_npz(tmp_path / "amb.npz")
