"""The operator's and the device owner's path (issue 14): portable bundles, a device's data as config,
state that knows what it belongs to, and a daemon that tells configuration errors from waiting."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from cloud_runtime.config import load_runtime_config
from cloud_runtime.provision import default_bind, provision
from conftest import make_npz_dataset
from edge_sdk.config import load_agent_config
from edge_sdk.agent import STATE_FILE
from edge_sdk.state import StateMismatch, check_state_identity, write_state
from edgefl_core.config import ConfigError
from edgefl_core.data.config import AgentDataConfig
from edgefl_core.data.datasets import DatasetError, load_dataset
from edgefl_core.data.local import data_fingerprint, describe_data, load_local_data
from edgefl_core.files import move_aside


# -- provision ---------------------------------------------------------------------------------------

def test_a_device_bundle_is_portable_and_private(tmp_path, npz_dir):
    result = provision(tmp_path / "deploy", ["pi-01", "pi-02"], host="127.0.0.1", port=18883, run_id="fleet1")
    bundle = result.agent_configs["pi-01"].parent
    text = result.agent_configs["pi-01"].read_text()
    assert str(tmp_path) not in text  # nothing of the provisioning machine's paths
    assert oct(bundle.stat().st_mode & 0o777) == "0o700"
    assert oct(result.agent_configs["pi-01"].stat().st_mode & 0o777) == "0o600"
    assert (bundle / "ca.crt").read_bytes() == result.ca_file.read_bytes()
    moved = tmp_path / "elsewhere" / "pi-01"  # "copy the folder to the device"
    shutil.copytree(bundle, moved)
    shutil.rmtree(tmp_path / "deploy")
    for split in ("train", "test"):
        shutil.copy(npz_dir / f"{split}.npz", moved / "data" / f"{split}.npz")
    cfg = load_agent_config(moved / "agent.yaml")
    assert cfg.broker.ca_file == str(moved / "ca.crt") and cfg.state_dir == str(moved / "state")
    assert cfg.data.dataset == "npz" and cfg.data.path == str(moved / "data") and cfg.run_id == "fleet1"
    train, test = load_local_data(cfg.data)
    assert len(train) == 400 and len(test) == 200


def test_the_runtime_config_holds_every_run_setting_and_loads(tmp_path):
    result = provision(tmp_path, ["a", "b", "c"], host="127.0.0.1", port=18883, run_id="fleet1")
    text = result.runtime_config.read_text()
    for key in ("rounds", "expected_devices", "min_devices", "registration_timeout_s", "round_deadline_s",
                "quorum", "edge", "server", "codec", "num_classes", "input_shape", "state_dir"):
        assert f"\n{key}:" in text, key
    assert text.count("\n# ") >= 15  # every setting says what it does
    cfg = load_runtime_config(result.runtime_config)
    assert cfg.expected_devices == 3 and cfg.input_shape == [1, 28, 28] and cfg.run_id == "fleet1"
    assert cfg.state_dir == str(result.runtime_config.parent / "state")  # beside its config, not in the cwd
    assert cfg.broker.ca_file == str(result.runtime_config.parent / "ca.crt")


def test_reprovisioning_keeps_the_operators_edits(tmp_path):
    first = provision(tmp_path, ["a"], host="127.0.0.1", port=18883, run_id="fleet1")
    agent = yaml.safe_load(first.agent_configs["a"].read_text())
    agent["data"] = {"dataset": "npz", "path": "/srv/photos"}
    agent["threads"] = 3
    first.agent_configs["a"].write_text(yaml.safe_dump(agent))
    runtime = yaml.safe_load(first.runtime_config.read_text())
    runtime["rounds"] = 40
    first.runtime_config.write_text(yaml.safe_dump(runtime))
    provision(tmp_path, ["b"], host="127.0.0.1", port=18883)
    agent = yaml.safe_load(first.agent_configs["a"].read_text())
    assert agent["data"]["path"] == "/srv/photos" and agent["threads"] == 3 and agent["run_id"] == "fleet1"
    runtime = yaml.safe_load(first.runtime_config.read_text())
    assert runtime["rounds"] == 40 and runtime["expected_devices"] == 2


def test_the_broker_listens_where_the_operator_said(tmp_path):
    assert default_bind("127.0.0.1") == "127.0.0.1" and default_bind("localhost") == "127.0.0.1"
    assert default_bind("broker.example.org") == "0.0.0.0"
    loop = provision(tmp_path / "a", ["d"], host="127.0.0.1", port=18883)
    assert "listener 18883 127.0.0.1" in loop.broker_conf.read_text()
    remote = provision(tmp_path / "b", ["d"], host="broker.example.org", port=8883)
    assert "listener 8883 0.0.0.0" in remote.broker_conf.read_text()
    pinned = provision(tmp_path / "c", ["d"], host="broker.example.org", port=8883, bind="10.0.0.5")
    assert "listener 8883 10.0.0.5" in pinned.broker_conf.read_text()
    with pytest.raises(ValueError, match="bind"):
        provision(tmp_path / "d", ["d"], bind="everywhere")


def test_help_shows_every_default():
    out = subprocess.run([sys.executable, "-m", "edgefl_cli.runtime", "provision", "--help"], capture_output=True,
                         text=True, check=True).stdout
    for text in ("8883", "825", "localhost", "fashion_mnist", "127.0.0.1 when --host is loopback"):
        assert text in " ".join(out.split()), text
    for prog in (["edgefl_cli.runtime", "serve"], ["edgefl_cli.agent"]):
        out = " ".join(subprocess.run([sys.executable, "-m", *prog, "--help"], capture_output=True, text=True,
                                      check=True).stdout.split())
        assert "--reset-state" in out and "override a config value" in out


# -- a device's data ---------------------------------------------------------------------------------

def test_an_agent_config_must_say_where_its_data_is(tmp_path):
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump({"device_id": "d0", "broker": {"url": "mqtt://127.0.0.1:1883"}}))
    with pytest.raises(ConfigError, match="no data section"):
        load_agent_config(path)


def test_paths_in_a_config_are_relative_to_it_and_set_paths_to_the_cwd(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    path = tmp_path / "cfg" / "agent.yaml"
    path.write_text(yaml.safe_dump({"device_id": "d0", "data": {"dataset": "npz", "path": "mine"},
                                    "state_dir": "~/st"}))
    monkeypatch.chdir(tmp_path)
    cfg = load_agent_config(path, ["data.ids_file=ids.json"])
    assert cfg.data.path == str(tmp_path / "cfg" / "mine") and cfg.data.ids_file == "ids.json"
    assert not cfg.state_dir.startswith("~")


def _write_png(path, array):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_a_plain_folder_of_images_per_class(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "photos"
    for split, n in (("train", 3), ("test", 1)):
        for label in (0, 2):
            for i in range(n):
                _write_png(root / split / str(label) / f"{i}.png", rng.integers(0, 255, (12, 10), dtype=np.uint8))
    train = load_dataset("image_folder", "train", str(root))
    assert train.images.shape == (6, 1, 12, 10) and sorted(set(train.labels.tolist())) == [0, 2]
    assert train.num_classes == 3
    rgb = tmp_path / "rgb"
    for name in ("cat", "dog"):
        _write_png(rgb / name / "a.png", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match="classes.txt"):
        load_dataset("image_folder", "train", str(rgb))
    (rgb / "classes.txt").write_text("dog\ncat\nbird\n")
    ds = load_dataset("image_folder", "train", str(rgb))
    assert ds.images.shape == (2, 3, 8, 8) and ds.labels.tolist() == [1, 0] and ds.num_classes == 3
    train, test = load_local_data(AgentDataConfig("image_folder", str(rgb)))
    assert test is None  # no test/ folder: nothing to evaluate locally, not an error
    _write_png(rgb / "dog" / "b.png", rng.integers(0, 255, (9, 8, 3), dtype=np.uint8))
    with pytest.raises(DatasetError, match="b.png: colour 8x9 pixels"):
        load_dataset("image_folder", "train", str(rgb))


def test_the_fingerprint_names_the_data_and_a_pinned_one_refuses_other_data(tmp_path):
    data = make_npz_dataset(tmp_path / "d")
    cfg = AgentDataConfig("npz", str(data))
    train, test = load_local_data(cfg)
    about = describe_data(cfg, train, test)
    assert about["fingerprint"] == data_fingerprint(*load_local_data(cfg)) and about["train_samples"] == 400
    other = make_npz_dataset(tmp_path / "e", seed=1)
    assert data_fingerprint(*load_local_data(AgentDataConfig("npz", str(other)))) != about["fingerprint"]
    load_local_data(AgentDataConfig("npz", str(data), fingerprint=about["fingerprint"]))
    with pytest.raises(DatasetError, match="the data changed"):
        load_local_data(AgentDataConfig("npz", str(other), fingerprint=about["fingerprint"]))


def test_exported_shards_are_disjoint(tmp_path, npz_dir):
    from edgefl_core.data.local import export_shard
    ids = []
    for k in (1, 2):
        export_shard("npz", str(npz_dir), tmp_path / str(k), k, 2, train=150, test=None)
        with np.load(tmp_path / str(k) / "train.npz") as f:
            ids.append(set(f["sample_ids"].tolist()))
            assert len(f["labels"]) == 150
    assert not ids[0] & ids[1]


# -- state that knows what it belongs to (item 2) -------------------------------------------------------

def _agent_yaml(tmp_path, data_dir, device="d0", run="r1"):
    path = tmp_path / f"{device}.yaml"
    path.write_text(yaml.safe_dump({"device_id": device, "run_id": run, "broker": {"url": "mqtt://127.0.0.1:9"},
                                    "data": {"dataset": "npz", "path": str(data_dir)},
                                    "state_dir": str(tmp_path / "state")}))
    return path


def test_agent_state_made_on_other_data_is_a_clear_error_not_a_traceback(tmp_path):
    first, second = make_npz_dataset(tmp_path / "a"), make_npz_dataset(tmp_path / "b", n_train=300)
    (tmp_path / "state").mkdir()
    fingerprint = data_fingerprint(*load_local_data(AgentDataConfig("npz", str(first))))
    write_state(tmp_path / "state" / STATE_FILE, meta={"device": "d0", "run": "r1", "data": fingerprint}, model={},
                optimizer={}, soft_logits=np.zeros((400, 4), np.float32), soft_present=np.zeros(400, bool))
    check_state_identity(tmp_path / "state" / STATE_FILE, device="d0", run="r1", data=fingerprint)
    proc = subprocess.run([sys.executable, "-m", "edgefl_cli.agent", "--config", str(_agent_yaml(tmp_path, second))],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert "progress made on other data" in proc.stderr and "--reset-state" in proc.stderr
    with pytest.raises(StateMismatch, match="in run 'r1', not 'd0' in 'r2'"):
        check_state_identity(tmp_path / "state" / STATE_FILE, device="d0", run="r2", data=fingerprint)


def test_reset_state_moves_the_old_state_aside(tmp_path):
    state = tmp_path / "state"
    assert move_aside(state) is None
    state.mkdir()
    (state / "agent_state.pt").write_bytes(b"x")
    aside = move_aside(state)
    assert not state.exists() and (aside / "agent_state.pt").read_bytes() == b"x" and ".old-" in aside.name
    state.mkdir()
    (state / "f").write_bytes(b"y")
    assert move_aside(state) != aside  # two resets in one second keep both


def _runtime(tmp_path, *extra):
    from cloud_runtime.service import build_runtime
    from edgefl_core.transport.memory import MemoryBus, MemoryTransport
    cfg = load_runtime_config(None, ["run_id=r1", f"state_dir={tmp_path / 'rt'}", "rounds=1", "num_classes=4",
                                     "input_shape=[1, 12, 12]", *extra])
    return build_runtime(cfg, MemoryTransport(MemoryBus(), "runtime"))


def test_runtime_state_of_another_run_is_refused_with_the_remedy(tmp_path):
    from cloud_runtime.service import StateMismatch as RuntimeStateMismatch
    first = _runtime(tmp_path)
    first.checkpoint()
    instance = first.identity["instance"]
    again = _runtime(tmp_path)
    again.restore()
    assert again.identity["instance"] == instance and again.downlink.recipe["instance"] == instance
    for change in ("run_id=r2", "server.model=resnet109_server", "input_shape=[3, 12, 12]"):
        with pytest.raises(RuntimeStateMismatch, match="--reset-state"):
            _runtime(tmp_path, change).restore()
    _runtime(tmp_path, "rounds=3", "server.lr=0.01").restore()  # a change within the run resumes
    move_aside(tmp_path / "rt")
    fresh = _runtime(tmp_path, "run_id=r2")
    assert not fresh.restore() and fresh.identity["instance"] != instance


def test_an_agent_drops_progress_of_another_run_instance(tmp_path):
    from edge_sdk.agent import build_agent
    from edgefl_core.transport.memory import MemoryBus, MemoryTransport
    from edge_sdk.config import load_agent_config as load
    data = make_npz_dataset(tmp_path / "data")
    cfg = load(_agent_yaml(tmp_path, data))
    runtime = _runtime(tmp_path)
    recipe = dict(runtime.downlink.recipe)
    agent = build_agent(cfg, MemoryTransport(MemoryBus(), "d0"))
    assert agent.configure(recipe)
    agent.progress.last_done = agent.progress.trained_round = 4
    agent.save_state()
    again = build_agent(cfg, MemoryTransport(MemoryBus(), "d0"))
    again.configure(recipe)
    assert again.progress.last_done == 4  # the same instance resumes
    again.configure({**recipe, "instance": "f" * 12})  # the runtime started the run afresh
    assert again.progress.last_done == -1 and again.run_instance == "f" * 12 and again.client is not None
    third = build_agent(cfg, MemoryTransport(MemoryBus(), "d0"))
    third.configure({**recipe, "instance": "e" * 12})
    assert third.progress.last_done == -1  # a saved state of another instance is not resumed at start either


def test_a_runtime_started_before_its_broker_waits_for_it(tmp_path, caplog):
    """The walkthrough once failed: a runtime started a second before mosquitto exited 2."""
    import logging
    import threading
    from cloud_runtime.service import build_runtime
    from edgefl_cli.mosquitto import EmbeddedMosquitto, free_port
    from edgefl_core.transport.mqtt import MqttTransport
    port = free_port()
    cfg = load_runtime_config(None, ["run_id=r1", f"state_dir={tmp_path / 'rt'}", f"broker.url=mqtt://127.0.0.1:{port}"])
    transport = MqttTransport(cfg.broker.url, "runtime")
    runtime = build_runtime(cfg, transport)
    broker = EmbeddedMosquitto(port=port)
    starter = threading.Timer(2.5, broker.start)
    starter.start()
    try:
        with caplog.at_level(logging.WARNING):
            runtime.start()
        assert transport.connected and "waiting for the broker" in caplog.text and "connection refused" in caplog.text
    finally:
        starter.join()
        transport.close()
        broker.stop()


def test_edgefl_sim_configs_written_under_a_relative_out_dir_load_from_anywhere(tmp_path, monkeypatch, npz_dir):
    """`make quickstart` (--out runs/quickstart) once wrote cwd-relative paths that the agents then read
    against their own folder: every agent exited 2 and round 0 never opened."""
    from cloud_runtime.config import load_config
    from edgefl_cli.simulation import write_deployment
    monkeypatch.chdir(tmp_path)
    shutil.copytree(npz_dir, tmp_path / "mydata")
    cfg = load_config(None, ["data.dataset=npz", "data.path=mydata", "run.devices=2"])
    Path("runs/x").mkdir(parents=True)
    deployment = write_deployment(cfg, Path("runs/x"), "mqtt://127.0.0.1:1883")
    monkeypatch.chdir("/")
    agent = load_agent_config(tmp_path / "runs/x" / deployment.agent_paths[0].relative_to(tmp_path / "runs/x"))
    assert Path(agent.data.ids_file).is_file() and Path(agent.data.path).is_dir()
    assert load_local_data(agent.data)[0] is not None
    runtime = load_runtime_config(deployment.runtime_path)
    assert Path(runtime.eval_data.ids_file).is_file() and Path(runtime.state_dir).is_absolute()
