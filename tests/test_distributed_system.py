"""The runtime as a torchrun launch and with ingest workers over a real mosquitto (system tier): 2 Gloo ranks
and 2 ingest workers against one process on Fashion-MNIST; a training rank killed with SIGKILL mid-round
(torchrun's elastic restart resumes the group from the last checkpoint) and an ingest worker killed mid-upload
(the runtime starts it again); every accepted sample is counted."""
import json
import os
import re
import signal
import time
from pathlib import Path

import pytest

from conftest import requires_fashion_mnist, wait_until
from edge_sdk import protocol as P
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
@pytest.mark.timeout(2400)  # two whole runs back to back: ~5 min on an idle 2-core machine, far more on a busy one
def test_two_gloo_ranks_and_two_ingest_workers_run_the_job_one_process_runs(tmp_path):
    """The same accepted samples and accuracy within 0.3 points: the same global batch (64, cut 32/32), global-
    batch BatchNorm statistics across ranks, so only floating-point summation order differs; every upload
    reassembled by one of 2 ingest workers (dev0 on shard 0, dev1 on shard 1) and judged by rank 0."""
    one = sim_report(tmp_path / "one")
    two = sim_report(tmp_path / "two", "deployment.server_ranks=2", "deployment.ingest_workers=2")
    assert two["run"]["server_ranks"] == {"world_size": 2, "backend": "gloo", "restart": 0}
    assert one["run"].get("server_ranks") is None and one["run"].get("ingest_workers") is None
    assert [P.ingest_shard("quickstart", f"dev{i}", 2) for i in range(2)] == [0, 1]
    assert two["run"]["ingest_workers"] == {"workers": 2, "forwarded_transfers": 2 * 2 * 2,  # train + test, 2 rounds
                                            "status": {"0": "online", "1": "online"}}
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


def ingest_worker_pid(runtime_pid: int, shard: int) -> int | None:
    for pid in children(runtime_pid):
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"edgefl_cli.ingest" in argv and argv[argv.index(b"--shard") + 1] == str(shard).encode():
            return pid
    return None


def test_an_ingest_worker_killed_mid_upload_is_replaced_and_nothing_is_lost(npz_dir, tmp_path, broker,
                                                                             procs):  # noqa: F811
    """kill -9 of dev1's ingest worker while dev1's round-1 upload is half sent: the runtime starts the worker
    again, the broker hands it the chunks queued for its session, dev1's sender asks for what the dead worker
    held and sends it again, and the run finishes with every accepted sample counted."""
    runtime_path, agents = deploy(tmp_path, broker, npz_dir, 2, 2, "deployment.chunk_bytes=4096",
                                  "deployment.ingest_workers=2")
    procs.append(spawn(["edgefl_cli.runtime", "serve", "--config", str(runtime_path)], tmp_path / "rt.log"))
    procs.append(spawn(["edgefl_cli.agent", "--config", str(agents[0])], tmp_path / "a0.log"))
    paced = ["edgefl_cli.agent", "--config", str(agents[1]), "--set", "upload.max_bytes_per_s=40000"]  # ~5 s uploads
    procs.append(spawn(paced, tmp_path / "a1.log"))
    shard = P.ingest_shard("quickstart", "dev1", 2)
    wait_until(lambda: "uploading round 1 train" in (tmp_path / "a1.log").read_text(), timeout=150)
    time.sleep(1.5)  # part of the transfer is at the worker, the rest still to be sent
    victim = ingest_worker_pid(procs[0].pid, shard)
    assert victim is not None
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: ingest_worker_pid(procs[0].pid, shard) not in (None, victim), timeout=30)
    successor = ingest_worker_pid(procs[0].pid, shard)
    assert procs[0].wait(240) == 0
    log = (tmp_path / "rt.log").read_text()
    assert f"ingest worker {shard} (pid {victim}) exited with -9: starting it again" in log
    assert "dev1: train upload of round 1 accepted" in log
    # what the dead worker held was sent again (the kill was mid-upload), and only that
    resent = re.search(r"dev1: train features of (\d+) chunks needed (\d+) re-sent", (tmp_path / "a1.log").read_text())
    assert resent and 0 < int(resent[2]) < int(resent[1]), resent
    total, per_round = accepted(tmp_path)
    assert total == 2 * TRAIN_SAMPLES and all(sum(r.values()) == TRAIN_SAMPLES for r in per_round)
    report = json.loads((tmp_path / "runtime" / "report.json").read_text())
    assert report["run"]["ingest_workers"]["workers"] == 2
    assert not alive(successor)   # the runtime stopped its workers at the end


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
