"""What the reviewers broke in the operator's path (issue 14), each with the test that would have caught it."""
from __future__ import annotations

import zlib

import numpy as np
import pytest
import yaml

from cloud_runtime.config import load_runtime_config
from cloud_runtime.provision import provision
from cloud_runtime.service import LATE_MESSAGES_PER_DEVICE, CloudRuntime, identity_problem
from edge_sdk import protocol as P
from edge_sdk.state import state_problem
from edgefl_core.chunking import Reassembler, chunk_transfer
from edgefl_core.config import ConfigError
from edgefl_core.data.config import AgentDataConfig
from edgefl_core.data.datasets import DatasetError, load_dataset
from edgefl_core.data.local import export_shard, load_local_data
from edgefl_core.files import move_aside
from edgefl_core.transport import MemoryBus


def test_reset_state_never_moves_the_bundle_that_holds_the_state(tmp_path):
    bundle = tmp_path / "pi-01"
    (bundle / "data").mkdir(parents=True)
    (bundle / "agent.yaml").write_text("x")
    for state_dir in (bundle, tmp_path):  # state_dir: . and state_dir: ..
        with pytest.raises(ConfigError, match="holds"):
            move_aside(state_dir, keep=(bundle / "agent.yaml", bundle / "data"))
    with pytest.raises(ConfigError, match="empty"):
        move_aside("", keep=())
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(ConfigError, match="symbolic link"):
        move_aside(tmp_path / "link")
    assert bundle.exists() and (tmp_path / "real" / "f").exists()


def test_junk_under_a_finished_transfer_id_is_checked_and_charged():
    r = Reassembler()
    frames = chunk_transfer(b"y" * 3000, run="r", device="d", round_=0, meta={"kind": "upload"}, max_chunk=1000)
    done = None
    for frame in frames:
        header, body = P.decode_frame(frame)
        done = r.add(header, body, len(frame)) or done
    assert done is not None
    header, body = P.decode_frame(frames[1])
    assert r.add(header, body, len(frames[1])) is None and r.duplicates == 1  # a real retransmission
    junk = b"z" * 5000
    for bad in ({**header, "crc32": 1}, {**header, "index": 999},
                {**header, "crc32": zlib.crc32(junk)}):  # a well-formed chunk larger than the whole transfer
        with pytest.raises(P.ProtocolError):
            r.add(bad, junk if bad.get("crc32") == zlib.crc32(junk) else body, 100)


def test_a_forged_session_buys_a_bounded_number_of_uncharged_messages(tmp_path):
    cfg = load_runtime_config(None, ["run_id=r", f"state_dir={tmp_path / 'rt'}", "rounds=1"])
    rt = CloudRuntime(cfg, MemoryBus().client("runtime"))
    topics = P.Topics("r")
    facts = {"session": "forged", "num_classes": 10, "feature_channels": 16, "train_samples": 30,
             "test_samples": 0, "input_shape": [1, 28, 28]}
    rt.handle(topics.up("mal"), P.control_frame(P.REGISTER, run="r", device="mal", round_=-1, **facts))
    heartbeat = P.control_frame(P.HEARTBEAT, run="r", device="mal", round_=0)
    for _ in range(LATE_MESSAGES_PER_DEVICE + 50):
        rt.handle(topics.heartbeat("mal"), heartbeat)
    assert rt.late_messages == LATE_MESSAGES_PER_DEVICE
    assert sum(rt.registry.rejections.values()) >= 50  # past the bound: charged like any unregistered device
    rt.handle(topics.up("mal"), P.control_frame(P.REGISTER, run="r", device="mal", round_=-1, **facts))
    assert rt.registry.rejections.get("bad_registration") == 1
    assert rt.report()["run"]["late_messages"] == LATE_MESSAGES_PER_DEVICE


@pytest.mark.parametrize("saved", [{"instance": "a", "definition": [1]}, {"instance": "a", "definition": "x"},
                                   {"instance": ""}, {"instance": 3}, [1], "x"])
def test_a_runtime_identity_of_odd_shape_is_a_mismatch_not_a_crash(saved):
    current = {"run_id": "r", "definition": {"algorithm": "fedgkt"}, "instance": "b"}
    assert "unreadable identity" in identity_problem(saved, current)


def test_an_agent_state_with_odd_values_is_not_half_resumed():
    model = {"weight": np.zeros((2, 2), np.float32), "bias": np.zeros(2, np.float32)}
    shapes = {k: v.shape for k, v in model.items()}
    good = {"device": "d", "run": "r", "recipe": "x", "soft_logits": np.zeros((5, 2), np.float32), "model": model,
            "soft_present": np.zeros(5, bool), "soft_round": -1, "last_done": 2, "trained_round": 2,
            "done_session": "", "optimizer": {}}
    assert state_problem(good, device="d", run="r", recipe="x", model=shapes, soft_shape=(5, 2)) is None
    for key, value in (("last_done", "x"), ("soft_round", None), ("soft_present", np.zeros(4)),
                       ("done_session", 5), ("trained_round", 2.5), ("model", {"weight": model["weight"]})):
        assert state_problem({**good, key: value}, device="d", run="r", recipe="x", model=shapes,
                             soft_shape=(5, 2)) is not None, key


def _png(path, array, mode=None):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path) if mode else Image.fromarray(array).save(path)


def test_image_folder_scales_16_bit_refuses_mixed_colour_and_skips_hidden_files(tmp_path):
    root = tmp_path / "imgs"
    ramp = np.linspace(0, 65535, 64, dtype=np.uint16).reshape(8, 8)
    _png(root / "0" / "a.png", ramp)
    (root / "0" / "._a.png").write_bytes(b"\0\0macos resource fork")
    (root / ".ipynb_checkpoints").mkdir()
    ds = load_dataset("image_folder", "train", str(root))
    assert len(ds) == 1 and ds.images.max() == 255 and (ds.images == 255).mean() < 0.05  # scaled, not clipped
    _png(root / "1" / "b.png", np.zeros((8, 8, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match="all grayscale or all colour"):
        load_dataset("image_folder", "train", str(root))
    named = tmp_path / "named"
    _png(named / "cat" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    (named / "classes.txt").write_text("cat\ndog\ncat\n")
    with pytest.raises(DatasetError, match="listed twice"):
        load_dataset("image_folder", "train", str(named))
    odd = tmp_path / "odd"
    _png(odd / "²" / "a.png", np.zeros((8, 8), dtype=np.uint8))
    with pytest.raises(DatasetError, match="classes.txt"):
        load_dataset("image_folder", "train", str(odd))


def test_a_device_lacking_the_top_class_says_the_runs_class_count(tmp_path):
    root = tmp_path / "imgs"
    for label in (0, 1):
        _png(root / str(label) / "a.png", np.zeros((8, 8), dtype=np.uint8))
    assert load_local_data(AgentDataConfig("image_folder", str(root)))[0].num_classes == 2
    train, _ = load_local_data(AgentDataConfig("image_folder", str(root), num_classes=10))
    assert train.num_classes == 10


def test_export_refuses_counts_that_make_no_data(tmp_path, npz_dir):
    for kwargs in ({"train": -5, "test": None}, {"train": 0, "test": None}):
        with pytest.raises(ValueError, match=">= 1"):
            export_shard("npz", str(npz_dir), tmp_path / "x", 1, 2, **kwargs)
    with pytest.raises(ValueError, match="cannot make"):
        export_shard("npz", str(npz_dir), tmp_path / "x", 1, 100_000, train=None, test=None)


def test_provision_refuses_ids_that_are_paths_or_break_its_files_and_names_bad_files(tmp_path):
    for device in ("..", ".", "a:b", "nl\nroot", "-x"):
        with pytest.raises(ValueError, match="device id"):
            provision(tmp_path / "d", [device])
    result = provision(tmp_path / "d", ["a"], host="127.0.0.1")
    result.agent_configs["a"].write_text("broker: [unclosed")
    with pytest.raises(ValueError, match="agent.yaml: invalid YAML"):
        provision(tmp_path / "d", ["a"], host="127.0.0.1")
    result.agent_configs["a"].write_text("- a list")
    with pytest.raises(ValueError, match="not a mapping"):
        provision(tmp_path / "d", ["a"], host="127.0.0.1")
    result.agent_configs["a"].write_text("broker:\n")
    provision(tmp_path / "d", ["a"], host="127.0.0.1")  # an emptied broker section is provisioned anew


def test_provision_writes_ipv6_hosts_as_urls_and_binds_ipv6(tmp_path):
    result = provision(tmp_path, ["a"], host="::1", port=18883)
    assert result.url == "mqtts://[::1]:18883" and "listener 18883 ::1" in result.broker_conf.read_text()
    agent = yaml.safe_load(result.agent_configs["a"].read_text())
    from edgefl_core.transport.mqtt import BrokerAddress
    assert BrokerAddress.parse(agent["broker"]["url"]).host == "::1"
    remote = provision(tmp_path / "r", ["a"], host="fd00::5", port=8883)
    assert "listener 8883 ::" in remote.broker_conf.read_text()


def _agent(tmp_path, data_dir, **cfg):
    from edge_sdk.agent import build_agent
    from edge_sdk.config import AgentConfig
    return build_agent(AgentConfig(device_id="d0", run_id="r", data=AgentDataConfig("npz", str(data_dir)),
                                   state_dir=str(tmp_path / "state"), **cfg), transport=MemoryBus().client("d0"))


def _hello(tmp_path, *extra):
    cfg = load_runtime_config(None, ["run_id=r", f"state_dir={tmp_path / 'rt'}", "rounds=1", *extra])
    rt = CloudRuntime(cfg, MemoryBus().client("runtime"))
    return {**rt.downlink.recipe, "session": "s1"}


def test_a_device_whose_data_the_run_cannot_use_says_so_and_exits_2(tmp_path):
    """It once registered, was rejected at the runtime, and waited forever without a word."""
    from conftest import make_npz_dataset
    agent = _agent(tmp_path, make_npz_dataset(tmp_path / "d", size=12))
    assert not agent.configure(_hello(tmp_path, "num_classes=4", "input_shape=[1, 28, 28]"))
    assert agent.stop.is_set() and agent.exit_code == 2 and agent.client is None


def test_a_device_lacking_the_runs_top_classes_takes_the_runs_class_count(tmp_path):
    from conftest import make_npz_dataset
    agent = _agent(tmp_path, make_npz_dataset(tmp_path / "d", size=12, classes=4))
    assert agent.train_set.num_classes == 4
    assert agent.configure(_hello(tmp_path, "num_classes=10", "input_shape=[1, 12, 12]"))
    assert agent.client is not None and agent.train_set.num_classes == 10 and not agent.stop.is_set()


def test_an_agent_run_as_a_service_waits_for_the_next_run(tmp_path, npz_dir):
    agent = _agent(tmp_path, npz_dir, after_run="wait")
    agent.registered_session = "s1"
    agent.on_shutdown({"session": "s1"})
    assert not agent.stop.is_set()
    leaving = _agent(tmp_path, npz_dir)
    leaving.registered_session = "s1"
    leaving.on_shutdown({"session": "s1"})
    assert leaving.stop.is_set()
