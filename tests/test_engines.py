"""One engine: the same config over MQTT (real processes, real mosquitto) and in memory (threads) agrees."""
import json

import pytest

from edgefl_cli.sim import main as sim_main

pytestmark = [pytest.mark.integration, pytest.mark.system]


def run(npz_dir, out, transport, *extra):
    args = ["--config", "configs/quickstart.yaml", "--out", str(out), "--log-level", "WARNING",
            "--transport", transport]
    for item in ("data.dataset=npz", f"data.path={npz_dir}", "data.train_subset=null", "run.devices=2",
                 "run.rounds=3", "edge.model_kwargs={}", "server.lr=0.003", "deployment.round_deadline_s=120",
                 *extra):
        args += ["--set", item]
    assert sim_main(args) == 0
    return json.loads((out / "report.json").read_text())


def test_sync_fedgkt_agrees_between_mqtt_and_memory(npz_dir, tmp_path):
    mqtt = run(npz_dir, tmp_path / "mqtt", "mqtt")
    memory = run(npz_dir, tmp_path / "memory", "memory")
    assert mqtt["run"]["transport"] == "mqtt" and memory["run"]["transport"] == "memory"
    for a, b in zip(mqtt["rounds"], memory["rounds"]):
        assert abs(a["test_accuracy"] - b["test_accuracy"]) <= 0.005, (a["test_accuracy"], b["test_accuracy"])
        assert a["accepted_samples"] == b["accepted_samples"]
        for device, wire in a["bytes_up"].items():  # same codec and chunking; only the JSON metrics' digits differ
            assert abs(wire - b["bytes_up"][device]) <= 0.001 * wire
    assert mqtt["final"]["accepted_samples"] == memory["final"]["accepted_samples"] == 3 * 400


def test_async_fedgkt_keeps_the_same_staleness_accounting_in_both(npz_dir, tmp_path):
    for transport in ("mqtt", "memory"):
        report = run(npz_dir, tmp_path / transport, transport, "deployment.mode=async", "deployment.max_staleness=2",
                     "run.rounds=4")
        assert report["run"]["mode"] == "async" and len(report["rounds"]) == 4
        for row in report["rounds"]:
            assert set(row["staleness"]) == set(row["participants"]) == set(row["device_rounds"])
            assert all(0 <= s <= 2 for s in row["staleness"].values())
            assert set(row["fresh"]) <= set(row["participants"])
            assert row["round"] == report["rounds"].index(row)  # one row per server update
