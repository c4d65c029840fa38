"""Fuzzing the wire decoder and the runtime's and agent's message handlers (hypothesis).

Thousands of malformed messages: none may raise out of a handler, each is rejected with a reason, and the
data accepted before them stays untouched. bench/fuzz.py runs the same generators for longer.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_runtime.config import load_runtime_config
from cloud_runtime.service import CloudRuntime
from edge_sdk import protocol as P
from edge_sdk.messages import FeatureUpload, MessageError
from edgefl_core.transport import MemoryBus
from tools.fuzzing import RUN, malformed_messages, valid_upload_frames

FUZZ = settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


@FUZZ
@given(st.binary(max_size=4096))
def test_decode_frame_raises_only_protocol_errors(payload):
    try:
        P.decode_frame(payload, max_body=1 << 20)
    except P.ProtocolError as e:
        assert e.reason  # every failure names its reason


@FUZZ
@given(st.binary(max_size=2048))
def test_unpack_arrays_raises_only_protocol_errors(blob):
    try:
        P.unpack_arrays(blob, max_bytes=1 << 20)
    except P.ProtocolError as e:
        assert e.reason


@pytest.fixture(scope="module")
def runtime(tmp_path_factory):
    cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={tmp_path_factory.mktemp('rt')}",
                                     "validation.quarantine_after=1000000"])
    rt = CloudRuntime(cfg, MemoryBus().client("runtime"))
    rt.register("devA", {"num_classes": 10, "feature_channels": 4, "train_samples": 30})
    for frame in valid_upload_frames():
        rt.handle(rt.topics.up("devA"), frame)
    assert "devA" in rt.strategy.train_uploads  # the accepted data every malformed message must leave alone
    return rt


@settings(max_examples=2500, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(malformed_messages())
def test_runtime_rejects_every_malformed_message_with_a_reason(runtime, message):
    topic, payload = message
    accepted = runtime.strategy.train_uploads["devA"]
    before = sum(runtime.registry.rejections.values())
    runtime.handle(topic, payload)  # must not raise
    assert sum(runtime.registry.rejections.values()) == before + 1, "a malformed message was neither rejected nor counted"
    assert runtime.strategy.train_uploads["devA"] is accepted
    assert all(isinstance(reason, str) and reason for reason in runtime.registry.rejections)
    assert runtime.registry.rejections["internal_error"] == 0  # every rejection is a named check, not a caught crash


@FUZZ
@given(malformed_messages(downlink=True))
def test_agent_downlink_decoding_never_raises_unexpectedly(message):
    """What edge-agent does with a downlink message: decode, reassemble, unpack, validate soft labels."""
    _, payload = message
    reassembler = P.Reassembler(max_transfer_bytes=1 << 20)
    try:
        header, body = P.decode_frame(payload, max_body=1 << 20)
        if header["type"] == P.CHUNK:
            done = reassembler.add(header, body)
            if done is not None:
                P.arrays_to_soft_labels(P.unpack_arrays(done.blob, 1 << 20), "devA", done.round).validate()
    except (P.ProtocolError, MessageError):
        pass


def test_generators_produce_decodable_valid_frames():
    frames = valid_upload_frames()
    header, _ = P.decode_frame(frames[0])
    assert header["type"] == P.CHUNK and json.loads(json.dumps(header))
    upload = FeatureUpload("devA", 0, "train", np.arange(3, dtype=np.int64), torch.zeros(3, 4, 5, 5),
                           torch.zeros(3, 10), torch.zeros(3, dtype=torch.int64))
    upload.validate(10)


# -- structure-aware fuzzing with an oracle (bench/fuzz.py runs the same for 20,000+ messages) ----------------


def test_structure_aware_uplink_fuzzing_every_invalid_message_is_a_named_rejection(tmp_path):
    from bench.fuzz import fuzz_runtime, make_runtime
    result = fuzz_runtime(make_runtime(str(tmp_path / "rt")), 2000, None)
    assert result["failure_count"] == 0, result["failures"]
    assert not result.get("crashes") and result["internal_errors"] == 0
    assert result["structured"] == 2000 and result["invalid"] > 2000
    assert result["invalid_rejected_with_reason"] == result["invalid"]


def test_structure_aware_control_fuzzing_never_crashes_or_stops_an_agent(tmp_path):
    from bench.fuzz import fuzz_agent
    result = fuzz_agent(800, None, tmp_path)
    assert result["failure_count"] == 0, result["failures"]
    assert not result.get("crashes") and result["invalid"] == result["invalid_dropped"] > 400


def test_per_device_floods_and_retained_uplink_frames_cost_only_their_sender(tmp_path):
    from bench.fuzz import flood_and_retained
    result = flood_and_retained(str(tmp_path))
    assert result["honest_upload_accepted"] and not result["honest_rejections"]
    assert result["flooder_holds_bytes"] <= 8 * 1024  # 8 open transfers, one 512-byte chunk each, charged 1 KiB
    assert result["retained_handled"] == 0 and result["retained_left_on_broker"] == 0
