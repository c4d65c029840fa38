"""Fault drills of the trust-boundary issue, as real processes over a real mosquitto: a broker that drops
messages over its queue limits (item 12), a broker down while an agent restarts mid-upload (item 11), a
full disk and a damaged checkpoint (item 14). Each ends with every accepted sample accounted for."""
import json
import shutil
import signal
import subprocess
import time

import pytest

from conftest import wait_until
from edgefl_cli.mosquitto import EmbeddedMosquitto
from edgefl_cli.sim import main as sim_main
from test_deployment import TRAIN_SAMPLES, accepted, deploy, edit_yaml, procs, spawn  # noqa: F401 (fixture)

pytestmark = [pytest.mark.integration, pytest.mark.system, pytest.mark.drill]


def sim_over(broker_url, npz_dir, out, *extra):
    args = ["--config", "configs/quickstart.yaml", "--out", str(out), "--log-level", "WARNING", "--broker", broker_url]
    for item in ["data.dataset=npz", f"data.path={npz_dir}", "data.train_subset=null", "run.devices=2",
                 "run.rounds=1", "edge.model_kwargs={}", "deployment.round_deadline_s=300", "deployment.codec=fp32",
                 "deployment.chunk_bytes=2048", *extra]:
        args += ["--set", item]
    start = time.perf_counter()
    assert sim_main(args) == 0
    return json.loads((out / "report.json").read_text()), time.perf_counter() - start


def test_a_broker_dropping_over_its_queue_limits_costs_time_never_data(npz_dir, tmp_path):
    """mosquitto with max_queued_messages 5 and max_inflight_messages 1 and 2 KiB fp32 chunks (about 1,400
    chunks per device) once left the run waiting until its timeout; now it finishes within 3x the time of
    the same run on a broker with room."""
    with EmbeddedMosquitto(workdir=tmp_path / "roomy") as roomy:
        base, base_s = sim_over(roomy.url, npz_dir, tmp_path / "undisturbed")
    tight_conf = "max_queued_messages 5\nmax_inflight_messages 1\n"
    with EmbeddedMosquitto(workdir=tmp_path / "tight", extra_config=tight_conf) as tight:
        assert "max_queued_messages 5" in (tight.workdir / "mosquitto.conf").read_text()
        report, tight_s = sim_over(tight.url, npz_dir, tmp_path / "tight-run")
    print(f"undisturbed {base_s:.1f}s, queue-limited {tight_s:.1f}s ({tight_s / base_s:.2f}x)")
    assert report["final"]["accepted_samples"] == base["final"]["accepted_samples"] == TRAIN_SAMPLES
    assert report["final"]["test_samples"] == base["final"]["test_samples"] == 200
    assert report["run"]["agent_exit_codes"] == [0, 0]
    assert tight_s <= 3 * base_s
    logs = "".join(p.read_text() for p in (tmp_path / "tight-run" / "logs").glob("dev*.log"))
    assert "re-sent chunks" in logs  # the broker did drop, and the agents made up for it


def test_broker_down_while_an_agent_restarts_mid_upload_loses_nothing(npz_dir, tmp_path, procs):  # noqa: F811
    with EmbeddedMosquitto(workdir=tmp_path / "broker", persistent=True) as broker:
        runtime_path, agents = deploy(tmp_path, broker, npz_dir, 2, 1, "deployment.chunk_bytes=4096")
        procs.append(spawn(["edgefl_cli.runtime", "serve", "--config", str(runtime_path)], tmp_path / "rt.log"))
        procs.append(spawn(["edgefl_cli.agent", "--config", str(agents[0])], tmp_path / "a0.log"))
        paced = ["edgefl_cli.agent", "--config", str(agents[1]), "--set", "upload.max_bytes_per_s=40000"]
        procs.append(spawn(paced, tmp_path / "a1.log"))
        wait_until(lambda: "uploading round 0 train" in (tmp_path / "a1.log").read_text(), timeout=150)
        time.sleep(1.5)  # part of the upload is at the runtime
        broker.stop()
        time.sleep(4.0)  # the agent cannot finish: nothing acknowledged, so nothing is done
        procs[2].send_signal(signal.SIGKILL)
        procs[2].wait()
        broker.start()
        procs.append(spawn(paced, tmp_path / "a1-restarted.log"))
        assert procs[0].wait(240) == 0
    assert "re-sending round 0 without retraining" in (tmp_path / "a1-restarted.log").read_text()
    total, per_round = accepted(tmp_path)
    assert total == TRAIN_SAMPLES and sum(per_round[0].values()) == TRAIN_SAMPLES
    assert procs[1].wait(60) == 0 and procs[3].wait(60) == 0


def _mount_tmpfs(path, size_bytes) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if shutil.which("mount") is None:
        return False
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)],
                            capture_output=True)
    return result.returncode == 0


def test_a_full_disk_during_checkpoints_is_a_status_and_the_run_finishes(npz_dir, tmp_path, procs):  # noqa: F811
    """The state directory on a filesystem with room for one generation of checkpoints (plus a little):
    the second commit fails with ENOSPC; the runtime says so and finishes the run from memory."""
    import io

    import torch

    from cloud_runtime.config import ServerConfig
    from cloud_runtime.server_trainer import GKTServer
    from model_zoo import create_model
    import numpy as np

    from edge_sdk.messages import FeatureUpload
    server = GKTServer(create_model("resnet55_server", num_classes=4, feature_channels=16),
                       ServerConfig(optimizer="adam"), 4)
    server.ingest(FeatureUpload("d", 0, "train", np.arange(8), torch.rand(8, 16, 12, 12), torch.randn(8, 4),
                                torch.randint(0, 4, (8,))))
    server.train_round(0)  # Adam's moments exist after a step: a checkpoint's real size
    buffer = io.BytesIO()
    torch.save(server.state_dict(), buffer)
    generation = len(buffer.getvalue())
    state_dir = tmp_path / "tiny"
    if not _mount_tmpfs(state_dir, int(1.5 * generation) + 256 * 1024):
        pytest.skip("cannot mount a tmpfs here (the in-process ENOSPC test covers the mechanism)")
    try:
        with EmbeddedMosquitto(workdir=tmp_path / "broker") as broker:
            runtime_path, agents = deploy(tmp_path, broker, npz_dir, 2, 2)
            edit_yaml(runtime_path, state_dir=str(state_dir))
            procs.append(spawn(["edgefl_cli.runtime", "serve", "--config", str(runtime_path)], tmp_path / "rt.log"))
            for i, agent in enumerate(agents):
                procs.append(spawn(["edgefl_cli.agent", "--config", str(agent)], tmp_path / f"a{i}.log"))
            assert procs[0].wait(300) == 0
        log = (tmp_path / "rt.log").read_text()
        assert "checkpoint failed (No space left on device" in log and "Traceback" not in log
        report = json.loads((state_dir / "report.json").read_text())
        assert [r["round"] for r in report["rounds"]] == [0, 1]
        assert report["final"]["accepted_samples"] == 2 * TRAIN_SAMPLES
        committed = json.loads((state_dir / "runtime.json").read_text())
        assert committed["generation"] == 1 and committed["next_round"] == 1  # what a restart resumes from
        assert not list(state_dir.glob("*.tmp"))
    finally:
        subprocess.run(["umount", str(state_dir)], capture_output=True)


def test_a_damaged_checkpoint_falls_back_a_generation_and_the_run_finishes(npz_dir, tmp_path, broker, procs):  # noqa: F811
    runtime_path, agents = deploy(tmp_path, broker, npz_dir, 2, 3)
    serve = ["edgefl_cli.runtime", "serve", "--config", str(runtime_path)]
    procs.append(spawn(serve, tmp_path / "rt.log"))
    for i, agent in enumerate(agents):
        procs.append(spawn(["edgefl_cli.agent", "--config", str(agent)], tmp_path / f"a{i}.log"))
    state = tmp_path / "runtime"

    def committed() -> int:  # the generation runtime.json names: runtime.2.json alone is not yet the commit
        try:
            return json.loads((state / "runtime.json").read_text()).get("generation", 0)
        except (OSError, ValueError):
            return 0
    wait_until(lambda: committed() >= 2, timeout=180)
    procs[0].send_signal(signal.SIGKILL)
    procs[0].wait()
    newest = state / "server.2.pt"
    newest.write_bytes(newest.read_bytes()[:1000])  # truncated
    procs.append(spawn(serve, tmp_path / "rt-restarted.log"))
    assert procs[-1].wait(240) == 0
    log = (tmp_path / "rt-restarted.log").read_text()
    assert "server.2.pt has" in log and "resumed from" in log and "at round 1" in log
    report = json.loads((state / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert report["run"]["checkpoint"]["skipped_on_restore"]
    total, per_round = accepted(tmp_path)
    assert total == 3 * TRAIN_SAMPLES and all(sum(r.values()) == TRAIN_SAMPLES for r in per_round)
