"""The runtime as a torchrun launch over a real mosquitto (system tier): 2 Gloo ranks against one process on
Fashion-MNIST, and a training rank killed with SIGKILL mid-round (torchrun's elastic restart resumes the
group from the last checkpoint; every accepted sample is counted)."""
import json
import os
import signal
import time
from pathlib import Path

import pytest

from conftest import requires_fashion_mnist, wait_until
from edgefl_cli.sim import main as sim_main
from test_deployment import TRAIN_SAMPLES, accepted, deploy, procs, spawn  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.system]


def sim_report(out, *extra):
    args = ["--config", "configs/quickstart.yaml", "--out", str(out), "--log-level", "WARNING"]
    for item in ["data.train_subset=4000", "data.test_subset=2000", "run.devices=2", "run.rounds=2",
                 "console.enabled=false", *extra]:
        args += ["--set", item]
    assert sim_main(args) == 0
    return json.loads((out / "report.json").read_text())


@requires_fashion_mnist
def test_two_gloo_ranks_run_the_job_one_process_runs(tmp_path):
    """The same accepted samples and accuracy within 0.3 points: the same global batch (64, cut 32/32), global-
    batch BatchNorm statistics across ranks, so only floating-point summation order differs."""
    one = sim_report(tmp_path / "one")
    two = sim_report(tmp_path / "two", "deployment.server_ranks=2")
    assert two["run"]["server_ranks"] == {"world_size": 2, "backend": "gloo", "restart": 0}
    assert one["run"].get("server_ranks") is None
    assert [r["accepted_samples"] for r in two["rounds"]] == [r["accepted_samples"] for r in one["rounds"]]
    assert two["final"]["accepted_samples"] == one["final"]["accepted_samples"] == 2 * 4000  # 2 rounds
    gap = abs(two["final"]["test_accuracy"] - one["final"]["test_accuracy"])
    assert gap <= 0.003 + 1e-9, (one["final"], two["final"])   # 0.3 points (of 2,000 test images: 6)


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(entry.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def rank_pid(torchrun_pid: int, rank: int) -> int | None:
    for pid in children(torchrun_pid):
        try:
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in env:
            return pid
    return None


def launch_until_round_1_trains(tmp_path, broker, npz_dir, procs, rounds, *torchrun_args) -> Path:  # noqa: F811
    """torchrun (procs[0]) of a 2-rank runtime and 2 agents over ``broker``; returns the runtime's log once the
    server is training round 1 on both ranks."""
    runtime_path, agents = deploy(tmp_path, broker, npz_dir, 2, rounds, "deployment.server_ranks=2")  # 1 thread
    launcher = ["torch.distributed.run", "--standalone", "--nproc-per-node", "2", *torchrun_args,
                "-m", "edgefl_cli.runtime", "serve", "--config", str(runtime_path)]
    log = tmp_path / "rt.log"
    procs.append(spawn(launcher, log))
    for i, agent in enumerate(agents):
        procs.append(spawn(["edgefl_cli.agent", "--config", str(agent)], tmp_path / f"a{i}.log"))
    wait_until(lambda: log.read_text().count("train upload of round 1 accepted") == 2, timeout=240)
    time.sleep(1.0)  # the server is training round 1 on both ranks
    return log


def test_a_training_rank_killed_mid_round_restarts_the_group_and_loses_nothing(npz_dir, tmp_path, broker,
                                                                               procs):  # noqa: F811
    log = launch_until_round_1_trains(tmp_path, broker, npz_dir, procs, 3, "--max-restarts", "1")
    pid = rank_pid(procs[0].pid, 1)
    assert pid is not None, "no rank 1 under torchrun"
    os.kill(pid, signal.SIGKILL)
    assert procs[0].wait(300) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert "rank 0 of 2 (gloo, restart 1)" in text and "resumed from" in text
    report = json.loads((tmp_path / "runtime" / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert report["run"]["server_ranks"]["restart"] == 1
    total, per_round = accepted(tmp_path)
    assert total == 3 * TRAIN_SAMPLES and all(sum(r.values()) == TRAIN_SAMPLES for r in per_round)
    assert procs[1].wait(60) == 0 and procs[2].wait(60) == 0


def test_sigterm_to_torchrun_mid_round_stops_every_rank_cleanly(npz_dir, tmp_path, broker, procs):  # noqa: F811
    """An operator's stop reaches every rank: the ranks train on to the next step, rank 0 shares its stop there,
    saves the rounds done and writes report.json; the ranks leave when it says so."""
    log = launch_until_round_1_trains(tmp_path, broker, npz_dir, procs, 4)
    procs[0].send_signal(signal.SIGTERM)
    procs[0].wait(120)
    text = log.read_text()
    assert "rank 1: round 1" in text and "(stopped)" in text, text[-3000:]
    assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text  # torchrun's own SIGTERM exit aside
    assert "stopped during server round 1" in text
    report = json.loads((tmp_path / "runtime" / "report.json").read_text())
    assert report["run"]["stopped"] and [r["round"] for r in report["rounds"]] == [0]
