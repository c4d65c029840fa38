"""The cloud runtime on a real mosquitto: bad input is dropped with a reason and counted, the runtime keeps
serving, and accepted data is untouched; duplicate and out-of-order chunks never double-count."""
import random
import zlib

import numpy as np
import pytest
import torch

from cloud_runtime.config import load_runtime_config
from cloud_runtime.service import build_runtime
from conftest import wait_until
from edge_sdk import protocol as P
from edge_sdk.messages import FeatureUpload
from edgefl_core.transport.mqtt import MqttTransport

pytestmark = pytest.mark.integration
RUN = "wire"


@pytest.fixture
def runtime(broker, tmp_path):
    cfg = load_runtime_config(None, [f"run_id={RUN}", f"broker.url={broker.url}", f"state_dir={tmp_path / 'rt'}",
                                     "rounds=2", "expected_devices=1"])
    rt = build_runtime(cfg)
    rt.start()
    yield rt
    rt.close()


@pytest.fixture
def device(broker):
    t = MqttTransport(broker.url, "test-devA")
    t.connect()
    yield t
    t.close()


def register(device, runtime, name="devA", **overrides):
    data = dict(num_classes=10, feature_channels=4, train_samples=30, test_samples=0, model="resnet8_gkt")
    data.update(overrides)
    device.publish(runtime.topics.up(name), P.control_frame(P.REGISTER, run=RUN, device=name, round_=-1, **data))


def upload_frames(round_=0, n=30, codec="fp16", mutate=None, device="devA", max_chunk=1500, seed=0, first_id=0,
                  scale=1.0):
    g = torch.Generator().manual_seed(seed)
    upload = FeatureUpload(device, round_, "train", np.arange(first_id, first_id + n, dtype=np.int64),
                           torch.rand(n, 4, 5, 5, generator=g) * scale,
                           torch.randn(n, 10, generator=g), torch.randint(0, 10, (n,), generator=g))
    arrays, meta = P.upload_to_arrays(upload, codec)
    if mutate:
        mutate(arrays, meta)
    return P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device=device, round_=round_, meta=meta,
                            max_chunk=max_chunk), upload


def send(device, topic, frames):
    for f in frames:
        device.publish(topic, f)
    assert device.flush(10)


def test_duplicates_and_out_of_order_chunks_count_once(runtime, device):
    register(device, runtime)
    wait_until(lambda: "devA" in runtime.registry.devices, step=runtime.pump)
    frames, upload = upload_frames(max_chunk=500)
    assert len(frames) > 5
    shuffled = frames + frames[::2]
    random.Random(1).shuffle(shuffled)
    send(device, runtime.topics.up("devA"), shuffled)
    wait_until(lambda: "devA" in runtime.strategy.train_uploads, step=runtime.pump)
    send(device, runtime.topics.up("devA"), frames)  # the whole transfer again (a QoS 1 retry storm)
    # flush() means the broker has them; wait until the runtime has seen every duplicate too
    wait_until(lambda: runtime.ingest.reassembler.duplicates >= len(frames[::2]) + len(frames), step=runtime.pump)
    got = runtime.strategy.train_uploads["devA"]
    assert (got.sample_ids == upload.sample_ids).all() and len(got.sample_ids) == 30
    assert runtime.registry.devices["devA"]["raw_fp32_bytes"] == P.upload_to_arrays(upload, "fp16")[1]["raw_fp32_bytes"]
    assert not runtime.registry.rejections


def _flip_crc(frames):
    header, body = P.decode_frame(frames[0])
    header["crc32"] = zlib.crc32(body) ^ 1
    return [P.encode_frame({k: v for k, v in header.items() if k != "v"}, body)] + frames[1:]


def _old_version(frames):
    return [f.replace(b'"v":1', b'"v":0', 1) for f in frames]


BAD_INPUTS = [
    ("truncated", lambda: [upload_frames()[0][0][:20]], "devA"),
    ("bad_magic", lambda: [b"garbage"], "devA"),
    ("bad_checksum", lambda: _flip_crc(upload_frames(seed=1)[0]), "devA"),
    ("bad_version", lambda: _old_version(upload_frames(seed=2)[0]), "devA"),
    ("oversized", lambda: upload_frames(seed=3, max_chunk=1 << 20, n=3000)[0], "devA"),
    ("bad_dtype", lambda: upload_frames(seed=4, mutate=lambda a, m: a.update(labels=a["labels"].astype(np.int32)))[0],
     "devA"),
    ("bad_shape", lambda: upload_frames(seed=5, mutate=lambda a, m: a.update(logits=a["logits"][:, :7]))[0], "devA"),
    ("non_finite", lambda: upload_frames(seed=6, mutate=lambda a, m: a["features"].__setitem__((0, 0, 0, 0), np.nan))[0],
     "devA"),
    ("stale_round", lambda: upload_frames(seed=7, round_=-1)[0], "devA"),
    ("future_round", lambda: upload_frames(seed=8, round_=5)[0], "devA"),
    ("unknown_device", lambda: upload_frames(seed=9, device="devZ")[0], "devZ"),
    ("spoofed_device", lambda: upload_frames(seed=10, device="devZ")[0], "devA"),  # devZ's frames on devA's topic
]


def test_bad_input_is_dropped_with_a_reason_and_accepted_data_stays(runtime, device):
    runtime.cfg.max_chunk_bytes = 512 * 1024
    runtime.cfg.validation.quarantine_after = 1000  # every reason is checked here; quarantine has its own test
    register(device, runtime)
    wait_until(lambda: "devA" in runtime.registry.devices, step=runtime.pump)
    good, upload = upload_frames()
    send(device, runtime.topics.up("devA"), good)
    wait_until(lambda: "devA" in runtime.strategy.train_uploads, step=runtime.pump)
    accepted = runtime.strategy.train_uploads["devA"]
    features = accepted.features.tensor()
    for reason, make, topic_device in BAD_INPUTS:
        before = runtime.registry.rejections[reason]
        send(device, runtime.topics.up(topic_device), make())
        wait_until(lambda: runtime.registry.rejections[reason] > before, step=runtime.pump, timeout=10)
    assert runtime.strategy.train_uploads["devA"] is accepted and torch.equal(accepted.features.tensor(), features)
    # and it still serves: a new valid registration and upload go through
    register(device, runtime, name="devB")
    wait_until(lambda: "devB" in runtime.registry.devices, step=runtime.pump)
    send(device, runtime.topics.up("devB"), upload_frames(device="devB", seed=11, first_id=100)[0])
    wait_until(lambda: "devB" in runtime.strategy.train_uploads, step=runtime.pump)


def test_implausible_values_and_foreign_sample_ids_are_rejected_then_the_device_is_quarantined(runtime, device):
    runtime.cfg.validation.quarantine_after = 3
    register(device, runtime)
    register(device, runtime, name="devB")
    wait_until(lambda: {"devA", "devB"} <= set(runtime.registry.devices), step=runtime.pump)
    send(device, runtime.topics.up("devA"), upload_frames()[0])  # devA's ids 0..29
    wait_until(lambda: "devA" in runtime.strategy.train_uploads, step=runtime.pump)
    send(device, runtime.topics.up("devB"), upload_frames(device="devB", seed=1, scale=5e4, first_id=100)[0])
    wait_until(lambda: runtime.registry.rejections["implausible_values"] == 1, step=runtime.pump)
    # ids are per-device names: devB uploading 20..49 names its own samples, never devA's (item 5)
    send(device, runtime.topics.up("devB"), upload_frames(device="devB", seed=2, first_id=20)[0])
    wait_until(lambda: "devB" in runtime.strategy.train_uploads, step=runtime.pump)
    assert runtime.strategy.train_uploads["devA"].sample_ids.tolist() == list(range(30))  # devA's data untouched
    send(device, runtime.topics.up("devB"), upload_frames(device="devB", seed=3, n=12, first_id=20)[0])
    wait_until(lambda: runtime.registry.rejections["sample_ids"] == 1, step=runtime.pump)  # registered 30 samples
    send(device, runtime.topics.up("devB"), upload_frames(device="devB", seed=4, first_id=100)[0])
    wait_until(lambda: runtime.registry.rejections["sample_ids"] == 2, step=runtime.pump)  # pinned to 20..49
    assert "differ from the 30 this device uploaded before" in runtime.registry.devices["devB"]["last_rejection"]["detail"]
    send(device, runtime.topics.up("devB"), upload_frames(device="devB", seed=5, scale=5e4, first_id=20)[0])
    wait_until(lambda: runtime.registry.rejections["implausible_values"] == 2, step=runtime.pump)
    info = runtime.registry.devices["devB"]
    assert info["rejection_reasons"] == {"implausible_values": 2, "sample_ids": 2}
    assert "quarantined_until" in info and info["quarantines"] == 1
    # quarantined: even a valid upload is ignored, with its own reason, until the quarantine ends
    runtime.strategy.train_uploads.pop("devB")
    send(device, runtime.topics.up("devB"), upload_frames(device="devB", seed=6, first_id=20)[0])
    wait_until(lambda: runtime.registry.rejections["quarantined"] >= 1, step=runtime.pump)
    assert "devB" not in runtime.strategy.train_uploads
    info["quarantined_until"] = 0  # time passes
    send(device, runtime.topics.up("devB"), upload_frames(device="devB", seed=7, first_id=20)[0])
    wait_until(lambda: "devB" in runtime.strategy.train_uploads, step=runtime.pump)


def test_inconsistent_registration_is_rejected(runtime, device):
    register(device, runtime)
    wait_until(lambda: "devA" in runtime.registry.devices, step=runtime.pump)
    register(device, runtime, name="devC", feature_channels=32)
    wait_until(lambda: runtime.registry.rejections["bad_registration"] == 1, step=runtime.pump)
    assert "devC" not in runtime.registry.devices


# -- FedAvg: poisoned models are rejected or clipped, never averaged in ------------------------------


@pytest.fixture
def fedavg_runtime(broker, tmp_path):
    cfg = load_runtime_config(None, [f"run_id={RUN}", "algorithm=fedavg", "edge.model=resnet8", f"broker.url={broker.url}",
                                     f"state_dir={tmp_path / 'rt'}", "rounds=1", "expected_devices=3"])
    rt = build_runtime(cfg)
    rt.start()
    yield rt
    rt.close()


def model_frames(state, device, scale=1.0, poison=None):
    arrays, meta = P.state_to_arrays({k: (v * scale if v.is_floating_point() else v) for k, v in state.items()},
                                     "fp32")
    if poison:
        arrays[poison] = np.full_like(arrays[poison], np.nan)
    meta.update(kind=P.KIND_MODEL_UPDATE, samples=30)  # what register() declares
    return P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device=device, round_=0, meta=meta)


def test_fedavg_rejects_nan_models_and_clips_scaled_updates(fedavg_runtime, device):
    rt = fedavg_runtime
    for name in ("devA", "devB", "devC"):
        register(device, rt, name=name, model="resnet8", feature_channels=16, input_shape=[1, 8, 8])
    wait_until(lambda: len(rt.registry.devices) == 3 and rt.strategy.global_model is not None, step=rt.pump)
    global_state = {k: v.clone() for k, v in rt.strategy.global_model.state_dict().items()}
    torch.manual_seed(0)
    honest = lambda: {k: (v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v)  # noqa: E731
                      for k, v in global_state.items()}
    send(device, rt.topics.up("devA"), model_frames(honest(), "devA"))
    send(device, rt.topics.up("devB"), model_frames(honest(), "devB"))
    send(device, rt.topics.up("devC"), model_frames(honest(), "devC", poison="body.fc.weight"))
    wait_until(lambda: rt.registry.rejections["non_finite"] == 1 and len(rt.strategy.model_updates) == 2, step=rt.pump)
    assert "devC" not in rt.strategy.model_updates
    send(device, rt.topics.up("devC"), model_frames(honest(), "devC", scale=1000.0))  # wildly scaled
    wait_until(lambda: len(rt.strategy.model_updates) == 3, step=rt.pump)
    row = rt.strategy.aggregate()
    assert row["clipped"] == ["devC"]
    drift = max(float((rt.strategy.global_model.state_dict()[k] - global_state[k]).abs().max())
                for k, v in global_state.items() if v.is_floating_point())
    assert drift < 1.0  # a 1000x model averaged in unclipped would move weights by hundreds


def test_fedavg_rejects_an_update_with_a_negative_batch_norm_variance(fedavg_runtime, device):
    """A small update (norm 5, far under max_update_norm) whose running_var is negative made the average's
    variance negative, and the global model's eval-mode outputs NaN for every device (found by a review with a
    valid device credential)."""
    rt = fedavg_runtime
    register(device, rt, name="devA", model="resnet8", feature_channels=16, input_shape=[1, 8, 8])
    wait_until(lambda: "devA" in rt.registry.devices and rt.strategy.global_model is not None, step=rt.pump)
    state = {k: v.clone() for k, v in rt.strategy.global_model.state_dict().items()}
    name = next(k for k in state if k.endswith("running_var"))
    state[name] -= 2.0
    send(device, rt.topics.up("devA"), model_frames(state, "devA"))
    wait_until(lambda: rt.registry.rejections["implausible_values"] == 1, step=rt.pump)
    assert "devA" not in rt.strategy.model_updates
    assert "negative variance" in rt.registry.devices["devA"]["last_rejection"]["detail"]
