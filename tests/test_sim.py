"""The in-process FedGKT simulator end to end on a small synthetic set (real data: bench/ and make quickstart)."""
import json

import pytest

from edgefl_cli.sim import main


def sim_args(npz_dir, out, *extra):
    return ["--config", "configs/quickstart.yaml", "--out", str(out), "--log-level", "WARNING", "--transport", "memory",
            "--set", "data.dataset=npz", "--set", f"data.path={npz_dir}", "--set", "data.train_subset=null",
            "--set", "run.devices=3", "--set", "run.rounds=3", "--set", "edge.model_kwargs={}",
            "--set", "server.lr=0.003", *extra]


def test_fedgkt_in_memory_learns_and_reports(npz_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sim_args(npz_dir, out, "--set", "data.partition=hetero", "--set", "data.min_samples_per_device=20")) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    for row in report["rounds"]:
        assert row["seconds"] > 0 and set(row["edge"]) == {"dev0", "dev1", "dev2"}
        assert 0 <= row["test_accuracy"] <= 1 and set(row["per_device"]) == {"dev0", "dev1", "dev2"}
    final = report["final"]
    assert final["test_samples"] == 200  # shard mode: every test image once
    assert final["test_accuracy"] > 0.6, final  # 4 easy classes: chance is 0.25
    assert report["rounds"][1]["edge"]["dev0"]["kd_coverage"] == 1.0  # KD on every sample after round 0
    assert report["rounds"][0]["edge"]["dev0"]["kd_coverage"] == 0.0
    assert sum(d["train_samples"] for d in report["devices"].values()) == 400
    assert (out / "accuracy.png").stat().st_size > 1000
    assert (out / "partition.json").exists() and (out / "config.yaml").exists()
    assert "final test accuracy" in capsys.readouterr().out


def test_full_test_split_evaluates_every_device_on_everything(npz_dir, tmp_path):
    out = tmp_path / "run"
    assert main(sim_args(npz_dir, out, "--set", "run.rounds=1", "--set", "data.test_split=full")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["test_samples"] == 600
    assert all(d["samples"] == 200 for d in report["rounds"][0]["per_device"].values())


@pytest.mark.parametrize("override, message", [
    ("edge.lrr=1", "unknown config key 'edge.lrr'"),
    ("edge.trainer=magic", "unknown trainer 'magic'"),
    ("data.path=/nonexistent", "does not exist"),
])
def test_bad_input_exits_2_with_a_named_error(npz_dir, tmp_path, caplog, override, message):
    args = sim_args(npz_dir, tmp_path / "run") + ["--set", override]
    assert main(args) == 2
    assert message in caplog.text
