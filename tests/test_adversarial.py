"""A malicious device with valid credentials on a provisioned TLS/ACL mosquitto, during a real run.

The same 2-device run twice, as real processes: undisturbed, then with ``mal`` (provisioned like the
honest devices) attacking from before the runtime starts until the run ends: retained frames on its
uplink, a valid registration, deeply nested and 4,300+ digit headers, data of the wrong type, frames
naming an honest device, a test split of another shape, the honest devices' sample ids with labels 0,
a flood of half-sent transfers, a transfer announcing a huge size, a zstd bomb, and publishes the ACL
must refuse (another device's uplink, another run id, the control topic). The honest devices must finish
every round with the same accepted samples as the undisturbed run and accuracy within 0.5 points, and
every rejection must be charged to ``mal``.
"""
from __future__ import annotations

import getpass
import hashlib
import json
import zlib

import numpy as np
import pytest
import torch
import yaml
import zstandard

from cloud_runtime.config import load_config
from cloud_runtime.provision import provision
from conftest import wait_until
from edge_sdk import protocol as P
from edge_sdk.messages import FeatureUpload
from edgefl_cli.mosquitto import EmbeddedMosquitto, free_port
from edgefl_cli.simulation import write_deployment
from edgefl_core.transport.mqtt import MqttTransport
from test_deployment import overrides, procs, spawn  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.system]
RUN = "adv"


def _raw(text: str, body: bytes = b"") -> bytes:
    raw = text.encode()
    return P.MAGIC + len(raw).to_bytes(4, "big") + raw + body


def run_fleet(tmp_path, npz_dir, provisioned, port, procs, attack=None):  # noqa: F811
    tmp_path.mkdir(parents=True, exist_ok=True)
    cfg = load_config("configs/quickstart.yaml", overrides(npz_dir, 2, 2, "run.name=adv", "deployment.quorum=1.0"))
    deployment = write_deployment(cfg, tmp_path, "mqtts://127.0.0.1")
    for path in [deployment.runtime_path, *deployment.agent_paths]:
        data = yaml.safe_load(path.read_text())
        source = provisioned.runtime_config if path == deployment.runtime_path else \
            provisioned.agent_configs[data["device_id"]]
        data["broker"] = {**yaml.safe_load(source.read_text())["broker"], "ca_file": str(provisioned.ca_file)}
        path.write_text(yaml.safe_dump(data))
    procs.append(spawn(["edgefl_cli.runtime", "serve", "--config", str(deployment.runtime_path)], tmp_path / "rt.log"))
    for i, path in enumerate(deployment.agent_paths):
        procs.append(spawn(["edgefl_cli.agent", "--config", str(path)], tmp_path / f"a{i}.log"))
    if attack is not None:
        attack(tmp_path)
    assert procs[0].wait(300) == 0, (tmp_path / "rt.log").read_text()[-3000:]
    for p in procs[1:3]:
        assert p.wait(60) == 0
    return json.loads((tmp_path / "runtime" / "report.json").read_text())


def attacker(provisioned, port):
    broker = yaml.safe_load(provisioned.agent_configs["mal"].read_text())["broker"]
    mal = MqttTransport(f"mqtts://127.0.0.1:{port}", "mal", username="mal", password=broker["password"],
                        ca_file=str(provisioned.agent_configs["mal"].parent / broker["ca_file"]))
    mal.connect(timeout=10)
    return mal


def attack_run(provisioned, port, state):
    topics = P.Topics(RUN)
    up = topics.up("mal")

    def register(**data):
        return P.control_frame(P.REGISTER, run=RUN, device="mal", round_=-1, **data)

    def before_start(mal):  # left on the broker before the runtime starts: ignored and cleared
        mal.publish(up, register(num_classes=2, feature_channels=1, train_samples=5), retain=True)
        mal.publish(topics.heartbeat("mal"), P.control_frame(P.HEARTBEAT, run=RUN, device="mal", round_=-1),
                    retain=True)

    def during(tmp_path):
        mal = state["mal"]
        wait_until(lambda: "round 0 open" in (tmp_path / "rt.log").read_text(), timeout=120)
        mal.publish(up, register(num_classes=4, feature_channels=16, train_samples=7, test_samples=3,
                                 input_shape=[1, 12, 12]))
        frames = [
            _raw('{"v":1,"type":"chunk","run":"adv","device":"mal","round":0,"data":' + "[" * 5000 + "]" * 5000 + "}"),
            _raw('{"v":1,"type":"register","run":"adv","device":"mal","round":' + "9" * 5000 + "}"),
            _raw('{"v":1,"type":"register","run":"adv","device":"mal","round":0,"data":[1,2]}'),
            _raw('{"v":1,"type":"register","run":"adv","device":"mal","round":0,"data":"x"}'),
        ]
        frames += [P.control_frame(P.REGISTER, run=RUN, device="dev0", round_=-1, num_classes=4)] * 5  # spoofed
        g = torch.Generator().manual_seed(0)
        test = FeatureUpload("mal", 0, "test", np.arange(3), torch.rand(3, 16, 5, 5, generator=g),
                             torch.randn(3, 4, generator=g), torch.zeros(3, dtype=torch.int64))
        arrays, meta = P.upload_to_arrays(test, "fp16")  # another feature shape than the run's
        frames += P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device="mal", round_=0, meta=meta)
        squat = FeatureUpload("mal", 0, "train", np.arange(200), torch.rand(200, 16, 12, 12, generator=g),
                              torch.randn(200, 4, generator=g), torch.zeros(200, dtype=torch.int64))
        arrays, meta = P.upload_to_arrays(squat, "int8")  # the honest devices' ids, all labelled 0
        frames += P.chunk_transfer(P.pack_arrays(arrays), run=RUN, device="mal", round_=0, meta=meta)
        for seed in range(30):  # half-sent transfers
            frames.append(P.chunk_transfer(np.random.default_rng(seed).bytes(4096), run=RUN, device="mal", round_=0,
                                           meta={"kind": "upload"}, max_chunk=1024)[0])
        body = bytes(256 << 10)
        for index in range(8):  # a transfer announcing 200 MB
            header = {"type": "chunk", "run": RUN, "device": "mal", "round": 0, "transfer": "huge", "index": index,
                      "count": 800, "size": 200 << 20, "crc32": zlib.crc32(body),
                      "sha256": hashlib.sha256(b"").hexdigest()}
            if index == 0:
                header["meta"] = {"kind": "upload", "split": "train", "codec": "int8"}
            frames.append(P.encode_frame(header, body))
        bomb = zstandard.ZstdCompressor(level=19).compress(b"\0" * (256 << 20))
        frames += P.chunk_transfer(bomb, run=RUN, device="mal", round_=0,
                                   meta={"kind": "upload", "split": "train", "codec": "int8"})
        for frame in frames:
            mal.publish(up, frame)
        refused_before = mal.refused_publishes
        for topic in (topics.up("dev0"), P.Topics("other-run").up("mal"), topics.control, topics.down("dev1")):
            mal.publish(topic, P.control_frame(P.SHUTDOWN, run=RUN, device="*", round_=0, session="x"))
        wait_until(lambda: mal.refused_publishes >= refused_before + 4, timeout=20)
        state["refused"] = mal.refused_publishes - refused_before
        mal.flush(30)

    return before_start, during


def test_a_malicious_device_with_valid_credentials_cannot_crash_lock_or_poison_the_run(npz_dir, tmp_path, procs):  # noqa: F811
    port = free_port()
    provisioned = provision(tmp_path / "deploy", ["dev0", "dev1", "mal"], host="127.0.0.1", port=port,
                            bind="127.0.0.1", run_id=RUN, broker_user=getpass.getuser())
    with EmbeddedMosquitto(port=port, workdir=tmp_path / "deploy" / "broker", config_file=provisioned.broker_conf):
        calm = run_fleet(tmp_path / "calm", npz_dir, provisioned, port, procs)
        procs.clear()
        state: dict = {}
        before_start, during = attack_run(provisioned, port, state)
        state["mal"] = attacker(provisioned, port)
        try:
            before_start(state["mal"])
            attacked = run_fleet(tmp_path / "attacked", npz_dir, provisioned, port, procs, attack=during)
        finally:
            state["mal"].close()
    log = (tmp_path / "attacked" / "rt.log").read_text()
    assert "Traceback" not in log and "internal error" not in log
    honest = ("dev0", "dev1")
    assert [r["participants"] for r in attacked["rounds"]] == [list(honest)] * 2
    for device in honest:
        assert attacked["devices"][device]["rejected"] == 0
        assert [r["accepted_samples"][device] for r in attacked["rounds"]] == \
               [r["accepted_samples"][device] for r in calm["rounds"]]
    assert abs(attacked["final"]["test_accuracy"] - calm["final"]["test_accuracy"]) <= 0.005
    mal = attacked["devices"]["mal"]
    reasons = mal["rejection_reasons"]
    print("calm", calm["final"]["test_accuracy"], "attacked", attacked["final"]["test_accuracy"], "mal:", reasons,
          "refused by the ACL:", state["refused"])
    assert mal.get("quarantines", 0) >= 1 and sum(reasons.values()) >= 20
    assert {"bad_header", "spoofed_device"} <= set(reasons)
    assert state["refused"] == 4
    charged = {line.split("rejected message from ")[1].split(":")[0] for line in log.splitlines()
               if "rejected message from " in line}
    assert charged == {"mal"}  # every rejection charged to the publisher the broker authenticated
