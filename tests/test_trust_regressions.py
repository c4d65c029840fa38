"""Regressions found by breaking the redesign as a device with a valid credential (and as a careless operator).

Each test is one kind of fault: a message that crashed or poisoned the runtime, or a rejection with a side
effect. The runtime and agent run in process over the in-memory bus."""
import json
import struct

import numpy as np
import pytest
import torch

from cloud_runtime.config import load_runtime_config
from cloud_runtime.service import CloudRuntime
from edge_sdk import protocol as P
from edge_sdk.agent import build_agent
from edge_sdk.config import AgentConfig
from edge_sdk.messages import FeatureUpload
from edgefl_core.config import ConfigError
from edgefl_core.data.config import AgentDataConfig
from edgefl_core.transport import MemoryBus

RUN = "trust"


def runtime(tmp_path, *overrides):
    cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={tmp_path / 'rt'}",
                                     "validation.quarantine_after=5", *overrides])
    rt = CloudRuntime(cfg, MemoryBus().client("runtime"))
    for device in ("devA", "devB"):
        rt.register(device, {"num_classes": 10, "feature_channels": 4, "train_samples": 30})
    return rt


def upload_frames(device, ids, extractor=None, max_chunk=1 << 20, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(ids)
    upload = FeatureUpload(device, 0, "train", np.asarray(ids, dtype=np.int64), torch.rand(n, 4, 5, 5, generator=g),
                           torch.randn(n, 10, generator=g), torch.randint(0, 10, (n,), generator=g))
    arrays, meta = P.upload_to_arrays(upload, "fp16")
    if extractor is not None:
        arrays.update({P.EXTRACTOR_PREFIX + k: v for k, v in extractor.items()})
    return P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device=device, round_=0, meta=meta, max_chunk=max_chunk)


def raw_frame(header_text: str) -> bytes:
    raw = header_text.encode()
    return P.MAGIC + struct.pack(">I", len(raw)) + raw


@pytest.mark.parametrize("header", [
    '{"v":1,"type":"register","run":"trust","device":"devA","round":0,"data":' + "[" * 5000 + "]" * 5000 + "}",
    '{"v":1,"type":"register","run":"trust","device":"devA","round":' + "9" * 5000 + "}",
    '{"v":1,"type":"register","run":"trust","device":"devA","round":0,"data":' + '{"a":' * 20 + "1" + "}" * 21,
    '{"v":1,"type":"register","run":"trust","device":"devA","round":1e400}',
    '{"v":1,"type":"register","run":"trust","device":"devA","round":99999999999999999999}',
])
def test_deep_nesting_and_huge_numbers_are_a_named_rejection(tmp_path, header):
    rt = runtime(tmp_path)
    rt.handle(rt.topics.up("devA"), raw_frame(header))
    assert rt.registry.rejections["bad_header"] == 1 and not rt.registry.rejections["internal_error"]
    assert rt.registry.devices["devA"]["rejection_reasons"] == {"bad_header": 1}  # charged to the topic's device


@pytest.mark.parametrize("data", ["[1, 2]", '"text"', "3"])
def test_data_of_the_wrong_type_is_a_named_rejection(tmp_path, data):
    rt = runtime(tmp_path)
    for topic in (rt.topics.up("devA"), rt.topics.heartbeat("devA"), rt.topics.status("devA")):
        rt.handle(topic, raw_frame('{"v":1,"type":"register","run":"trust","device":"devA","round":0,"data":'
                                   + data + "}"))
    assert rt.registry.rejections["bad_payload"] == 3 and not rt.registry.rejections["internal_error"]


def test_a_rejected_upload_claims_no_sample_ids(tmp_path):
    """devA's upload with a NaN extractor is rejected; the ids it named stay free for their owner."""
    rt = runtime(tmp_path, "fedgkt.average_extractors=true")
    bad = {"weight": np.full((2, 2), np.nan, dtype=np.float32)}
    for frame in upload_frames("devA", range(30), extractor=bad):
        rt.handle(rt.topics.up("devA"), frame)
    assert rt.registry.rejections["non_finite"] == 1 and not rt.strategy.train_uploads
    for frame in upload_frames("devB", range(30)):
        rt.handle(rt.topics.up("devB"), frame)
    assert "devB" in rt.strategy.train_uploads and not rt.registry.rejections["sample_ids"]


def test_a_chunk_that_fails_its_checksum_is_not_counted_as_traffic(tmp_path):
    rt = runtime(tmp_path)
    frame = bytearray(upload_frames("devA", range(30))[0])
    frame[-1] ^= 0xFF
    rt.handle(rt.topics.up("devA"), bytes(frame))
    assert rt.registry.rejections["bad_checksum"] == 1 and rt.registry.devices["devA"]["bytes_up"] == 0


def test_one_device_cannot_use_up_the_open_transfer_budget(tmp_path):
    """Half-sent transfers are limited per device: devA's flood costs devA, devB's upload still lands."""
    rt = runtime(tmp_path, "validation.quarantine_after=1000")
    for seed in range(50):
        rt.handle(rt.topics.up("devA"), upload_frames("devA", range(30), max_chunk=512, seed=seed)[0])
    assert rt.registry.rejections["too_many_transfers"] == 50 - rt.ingest.reassembler.max_pending_per_device
    for frame in upload_frames("devB", range(30, 60), max_chunk=512):
        rt.handle(rt.topics.up("devB"), frame)
    assert "devB" in rt.strategy.train_uploads
    assert "too_many_transfers" not in rt.registry.devices["devB"].get("rejection_reasons", {})


@pytest.mark.parametrize("field, value", [("input_shape", "abc"), ("input_shape", [3, 10**6, 2]),
                                          ("train_samples", -1), ("train_samples", True), ("profile", ["x"])])
def test_registration_fields_are_checked_and_charged(tmp_path, field, value):
    rt = runtime(tmp_path)
    data = {"num_classes": 10, "feature_channels": 4, "train_samples": 30, field: value}
    rt.handle(rt.topics.up("devA"), P.control_frame(P.REGISTER, run=RUN, device="devA", round_=-1, **data))
    assert rt.registry.rejections["bad_registration"] == 1 and not rt.registry.rejections["internal_error"]


def test_a_registration_cannot_choose_the_model_the_runtime_builds_or_profiles(tmp_path):
    """FedAvg's global model is the run's edge.model; a device's claimed model and kwargs are ignored, and
    whatever it sends, the runtime can still checkpoint (a deeply nested kwargs dict once crashed it)."""
    cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={tmp_path / 'rt'}", "algorithm=fedavg",
                                     "edge.model=resnet8"])
    rt = CloudRuntime(cfg, MemoryBus().client("runtime"))
    nested: dict = {}
    node = nested
    for _ in range(5):
        node["k"] = {}
        node = node["k"]
    rt.handle(rt.topics.up("devA"), P.control_frame(
        P.REGISTER, run=RUN, device="devA", round_=-1, num_classes=10, feature_channels=16, train_samples=30,
        model="resnet110", model_kwargs=nested, input_shape=[1, 8, 8], batch_size=10**6))
    assert not rt.registry.rejections, rt.registry.rejections
    assert type(rt.strategy.global_model).__name__ == type(__import__("model_zoo").create_model(
        "resnet8", in_channels=1)).__name__
    assert rt.registry.devices["devA"]["model"] == "resnet8" and rt.registry.devices["devA"]["batch_size"] == 64
    rt.checkpoint()
    assert json.loads((tmp_path / "rt" / "runtime.json").read_text())["num_classes"] == 10


def test_fedavg_samples_must_match_the_registration(tmp_path):
    cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={tmp_path / 'rt'}", "algorithm=fedavg",
                                     "edge.model=resnet8"])
    rt = CloudRuntime(cfg, MemoryBus().client("runtime"))
    rt.register("devA", {"num_classes": 10, "feature_channels": 16, "train_samples": 30, "input_shape": [1, 8, 8]})
    for samples in (10**400, 10**6):
        arrays, meta = P.state_to_arrays(rt.strategy.global_model.state_dict(), "fp32")
        meta.update(kind=P.KIND_MODEL_UPDATE, samples=samples)
        for frame in P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device="devA", round_=0, meta=meta):
            rt.handle(rt.topics.up("devA"), frame)
    assert not rt.strategy.model_updates and not rt.registry.rejections["internal_error"]


@pytest.mark.parametrize("override, message", [
    ("edge_overrides={devB: {model: resnet20_gkt}}", "model is the run's"),
    ("edge_overrides={devB: {epochs: 0}}", "edge_overrides.devB.epochs"),
    ("edge_overrides={devB: 3}", "expected a mapping"),
    ("edge.model_kwargs={bogus: 1}", "edge.model_kwargs"),
])
def test_a_runtime_config_that_would_break_every_device_is_refused_at_load(override, message):
    with pytest.raises(ConfigError, match=message):
        load_runtime_config(None, [override])


def test_an_agent_survives_bad_recipes_and_round_announcements_and_takes_a_good_one(npz_dir):
    agent = build_agent(AgentConfig(device_id="devA", run_id=RUN, data=AgentDataConfig("npz", str(npz_dir))),
                        transport=MemoryBus().client("devA"))
    control = P.Topics(RUN).control
    good = {"algorithm": "fedgkt", "edge": {"model": "resnet8_gkt"}, "codec": "int8", "model_codec": "fp16"}
    for bad in ({"edge": {"model": "resnet8_gkt", "model_kwargs": {"bogus": 1}}}, {"edge": {"model": "nope"}},
                {"codec": "zip"}, "text"):
        recipe = {**good, **bad} if isinstance(bad, dict) else bad
        agent.handle(control, P.control_frame(P.HELLO, run=RUN, device="*", round_=0, session="s1", recipe=recipe))
        assert agent.client is None and agent.recipe is None
    agent.handle(control, P.control_frame(P.HELLO, run=RUN, device="*", round_=0, session="s1", recipe=good,
                                           edge_overrides={"devA": {"epochs": 2}, "devB": "junk"}))
    assert agent.client is not None and agent.recipe.edge.epochs == 2
    for data in ({"soft_labels_to": 5}, {"soft_labels_wait_s": "x"}, {"soft_labels_round": "r"}):
        agent.handle(control, P.control_frame(P.ROUND, run=RUN, device="*", round_=1, session="s1", recipe=good,
                                               **data))
        assert agent.pending_round is None
    agent.handle(control, P.control_frame(P.ROUND, run=RUN, device="*", round_=-1, session="s1", recipe=good))
    assert agent.pending_round is None and agent.rejected == 4


def test_run_facts_come_from_the_runtime_config_when_it_sets_them(tmp_path):
    """With num_classes and input_shape configured (edgefl-sim sets both), the first registration cannot
    pin wrong facts, the feature shape is the run's edge model's, and every split is checked against it."""
    cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={tmp_path / 'rt'}", "num_classes=10",
                                     "input_shape=[1, 10, 10]", "edge.model_kwargs={stem_stride: 2}"])
    rt = CloudRuntime(cfg, MemoryBus().client("runtime"))
    for data in ({"num_classes": 2, "feature_channels": 16}, {"num_classes": 10, "feature_channels": 1},
                 {"num_classes": 10, "feature_channels": 16, "input_shape": [3, 10, 10]}):
        rt.handle(rt.topics.up("devA"), P.control_frame(P.REGISTER, run=RUN, device="devA", round_=-1,
                                                        train_samples=30, **data))
    assert rt.registry.rejections["bad_registration"] == 3 and not rt.registry.devices
    rt.register("devA", {"num_classes": 10, "feature_channels": 16, "train_samples": 30, "input_shape": [1, 10, 10]})
    assert rt.strategy.server.feature_shape == (16, 5, 5)


def test_a_test_upload_of_another_shape_is_rejected_at_acceptance(tmp_path):
    """A test split accepted with another shape than the train split's once crashed evaluation a round later."""
    rt = runtime(tmp_path)
    rt.register("devA", {"num_classes": 10, "feature_channels": 4, "train_samples": 30, "test_samples": 10})
    g = torch.Generator().manual_seed(0)
    test = FeatureUpload("devA", 0, "test", np.arange(100, 110, dtype=np.int64), torch.rand(10, 4, 3, 3, generator=g),
                         torch.randn(10, 10, generator=g), torch.randint(0, 10, (10,), generator=g))
    arrays, meta = P.upload_to_arrays(test, "fp16")
    for frame in P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device="devA", round_=0, meta=meta):
        rt.handle(rt.topics.up("devA"), frame)
    assert "devA" in rt.strategy.test_uploads
    for frame in upload_frames("devB", range(30)):  # 4 x 5 x 5: another shape than the accepted test split
        rt.handle(rt.topics.up("devB"), frame)
    assert rt.registry.rejections["bad_shape"] == 1 and "devB" not in rt.strategy.train_uploads
    seven = FeatureUpload("devB", 0, "train", np.arange(30, dtype=np.int64), torch.rand(30, 7, 3, 3, generator=g),
                          torch.randn(30, 10, generator=g), torch.randint(0, 10, (30,), generator=g))
    arrays, meta = P.upload_to_arrays(seven, "fp16")
    for frame in P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device="devB", round_=0, meta=meta):
        rt.handle(rt.topics.up("devB"), frame)
    assert rt.registry.rejections["bad_shape"] == 2  # 7 channels, the run registered 4


def test_a_profile_is_a_name_never_a_path_on_the_runtime_host(tmp_path):
    rt = runtime(tmp_path)
    rt.handle(rt.topics.up("devA"), P.control_frame(P.REGISTER, run=RUN, device="devA", round_=-1, num_classes=10,
                                                    feature_channels=4, train_samples=30,
                                                    profile="/etc/ssl/openssl.cnf"))
    assert rt.registry.rejections["bad_registration"] == 1


def test_the_agent_frees_half_sent_downlink_transfers_and_survives_old_state(npz_dir, tmp_path):
    cfg = AgentConfig(device_id="devA", run_id=RUN, data=AgentDataConfig("npz", str(npz_dir)),
                      state_dir=str(tmp_path / "state"))
    agent = build_agent(cfg, transport=MemoryBus().client("devA"))
    good = {"algorithm": "fedgkt", "edge": {"model": "resnet8_gkt"}, "codec": "int8", "model_codec": "fp16"}
    agent.handle(P.Topics(RUN).control, P.control_frame(P.HELLO, run=RUN, device="*", round_=0, session="s",
                                                        recipe=good))
    agent.save_state()
    # the same device, now with another model width: the saved state does not fit and is ignored, not fatal
    again = build_agent(cfg, transport=MemoryBus().client("devA2"))
    wider = {**good, "edge": {"model": "resnet8_gkt", "model_kwargs": {"width": 2}}}
    again.handle(P.Topics(RUN).control, P.control_frame(P.HELLO, run=RUN, device="*", round_=0, session="s",
                                                        recipe=wider))
    assert again.client is not None and again.progress.last_done == -1
    for i in range(80):  # half-sent transfers: the first chunk of two, never completed
        frame = P.chunk_transfer(b"x" * 2048, run=RUN, device="devA", round_=0, meta={"kind": "soft_labels"},
                                 max_chunk=1024)[0]
        again.handle(P.Topics(RUN).down("devA"), frame)
    assert again.downlink.reassembler.open_transfers == 64
    expired = again.downlink.reassembler.expire(now=1e12)
    assert len(expired) == 64 and again.downlink.reassembler.open_transfers == 0


def test_a_device_s_rejection_flood_is_one_log_line_that_counts_the_rest(caplog, monkeypatch):
    """A flood of rejections from one device is one warning per REJECTION_EVENT_EVERY_S, the next saying how
    many were not logged; another device's rejection is logged at once."""
    import logging
    from cloud_runtime import registry as R
    clock = [1000.0]
    monkeypatch.setattr(R.time, "time", lambda: clock[0])
    monkeypatch.setattr(R.time, "monotonic", lambda: clock[0])
    registry = R.DeviceRegistry(R.RuntimeConfig())
    caplog.set_level(logging.WARNING, logger="edgefl.runtime")
    for _ in range(50):
        registry.reject("bad_payload", "mallory", "junk")
    registry.reject("bad_payload", "alice", "junk")
    clock[0] += R.REJECTION_EVENT_EVERY_S
    registry.reject("bad_payload", "mallory", "junk")
    lines = [r.getMessage() for r in caplog.records]
    assert [line.split(":")[0] for line in lines] == ["rejected message from mallory", "rejected message from alice",
                                                     "rejected message from mallory"]
    assert lines[2].endswith("(49 more since the last line)") and "more since" not in lines[0] + lines[1]
    assert registry.rejections["bad_payload"] == 52


def test_text_a_device_sent_cannot_forge_log_lines_or_rewrite_the_terminal():
    """A registration's field with a newline and a forged timestamped line, terminal escapes and a 145 KB value
    reached the runtime's log as written (found by a review with a valid device credential): the CLIs' log
    format escapes control characters and cuts long messages; tracebacks keep their lines."""
    import logging
    from edgefl_cli.logs import MAX_MESSAGE_CHARS, OneLineFormatter
    formatter = OneLineFormatter("%(levelname)s %(message)s")
    forged = "3\n09:00:00 ERROR edgefl.runtime: dev0 quarantined\x1b[2K\x1b[31m\u2028"
    record = logging.LogRecord("edgefl.runtime", logging.WARNING, __file__, 1, "rejected: %s", (forged,), None)
    line = formatter.format(record)
    assert "\n" not in line and "\x1b" not in line and "\u2028" not in line
    assert line == "WARNING rejected: 3\\n09:00:00 ERROR edgefl.runtime: dev0 quarantined\\x1b[2K\\x1b[31m\\x2028"
    huge = logging.LogRecord("edgefl.runtime", logging.WARNING, __file__, 1, "%s", ("A" * 145_000,), None)
    assert len(formatter.format(huge)) < MAX_MESSAGE_CHARS + 100
    try:  # an internal error whose message quotes a device's text: its traceback keeps its lines, indented
        raise ValueError(f"bad field {forged!r} or {forged}")
    except ValueError:
        import sys
        failed = logging.LogRecord("x", logging.ERROR, __file__, 1, "it failed", (), sys.exc_info())
    text = formatter.format(failed)
    assert text.count("\n") >= 3 and "\x1b" not in text and "\u2028" not in text
    hidden = logging.LogRecord("x", logging.WARNING, __file__, 1, "%s", ("a\u202eb\u200bc\u2066",), None)
    assert formatter.format(hidden) == "WARNING a\\x202eb\\x200bc\\x2066"  # bidi and zero-width made visible
    try:
        raise ValueError("B" * 100_000)
    except ValueError:
        long = logging.LogRecord("x", logging.ERROR, __file__, 1, "it failed", (), sys.exc_info())
    assert max(len(line) for line in formatter.format(long).split("\n")) < MAX_MESSAGE_CHARS + 100
    assert all(line.startswith("  ") for line in text.split("\n")[1:])  # no line passes for a record
    assert "Traceback (most recent call last):" in text and "  ValueError: bad field" in text


def test_a_device_repeating_registrations_or_status_is_a_few_log_lines(caplog, monkeypatch):
    """5,000 registrations were 5,000 log lines, and 5,000 status messages of a quarantined device 5,000 more
    (found by a review with a valid device credential): at most 3 lines per device and kind every few seconds,
    the next counting the rest; another device is logged as ever."""
    import logging
    from cloud_runtime import registry as R
    clock = [1000.0]
    monkeypatch.setattr(R.time, "time", lambda: clock[0])
    monkeypatch.setattr(R.time, "monotonic", lambda: clock[0])
    registry = R.DeviceRegistry(R.RuntimeConfig())
    caplog.set_level(logging.INFO, logger="edgefl.runtime")
    facts = {"train_samples": 10, "test_samples": 0, "profile": None, "engine": "torch"}
    for i in range(100):
        registry.register("mallory", {**facts, "pid": i}, {})
        registry.on_status("mallory", {"online": i % 2 == 0})
    registry.register("alice", facts, {})
    clock[0] += R.REJECTION_EVENT_EVERY_S
    registry.register("mallory", facts, {})
    lines = [r.getMessage() for r in caplog.records]
    assert sum("mallory" in line and "registered" in line for line in lines) == 4
    assert sum(line.startswith("mallory is") for line in lines) == 3
    assert any(line.startswith("alice registered") for line in lines)
    assert lines[-1].startswith("mallory re-registered") and lines[-1].endswith("(97 more since the last line)")


def test_one_device_s_extractor_cannot_drag_the_average_the_others_load():
    """Within every bound (weights at 1e4, variances of 0) and claiming a large share, one extractor made the
    average one that made every honest device's features implausible: they were rejected and quarantined, and
    the attacker trained alone (found by a review with a valid device credential). Each extractor is pulled to
    within 3x the median distance from the coordinate median before the weighted average."""
    import torch
    from cloud_runtime.aggregation import average_torch_states
    from cloud_runtime.strategies.fedgkt import clipped_extractors
    torch.manual_seed(0)
    honest = [{"0.weight": 1.0 + 0.01 * torch.randn(4, 4), "1.running_var": 1.0 + 0.01 * torch.rand(4),
               "1.num_batches_tracked": torch.tensor(5)} for _ in range(3)]
    evil = {"0.weight": torch.full((4, 4), 1e4), "1.running_var": torch.zeros(4),
            "1.num_batches_tracked": torch.tensor(5)}
    average = average_torch_states(clipped_extractors(honest + [evil]), [100, 100, 100, 1_000_000])
    assert float((average["0.weight"] - 1.0).abs().max()) < 0.2 and float(average["1.running_var"].min()) > 0.9
    plain = average_torch_states(honest, [1, 2, 3])  # honest devices alone: the plain weighted average
    assert all(torch.equal(plain[k], v) for k, v in average_torch_states(clipped_extractors(honest), [1, 2, 3]).items())


def test_a_torch_device_stating_a_program_digest_is_not_logged_as_running_one(caplog):
    """A device on engine torch that states an edge program's digest was logged as running it (a review with a
    valid device credential): only an onnxruntime device runs edge programs."""
    import logging
    from cloud_runtime import registry as R
    caplog.set_level(logging.INFO, logger="edgefl.runtime")
    registry = R.DeviceRegistry(R.RuntimeConfig())
    facts = {"train_samples": 30, "engine": "torch"}
    for device, engine in (("dev0", "torch"), ("dev1", "onnxruntime")):
        registry.register(device, R.device_facts({**facts, "engine": engine}), {})
        registry.register(device, R.device_facts({**facts, "engine": engine, "program": device[-1] * 64}), {})
    said = [r.getMessage() for r in caplog.records]
    assert not any(line.startswith("dev0 runs edge program") for line in said), said
    assert "dev1 runs edge program 111111111111 (engine onnxruntime)" in said
    assert registry.devices["dev0"]["program"] is None and registry.devices["dev1"]["program"] == "1" * 64
