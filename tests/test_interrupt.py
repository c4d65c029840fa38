"""Ctrl-C: edgefl-sim and cloud-runtime serve stop cleanly (no traceback), write the report and plots of the
rounds done, and exit 130; a second Ctrl-C stops at once."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cloud_runtime import progress
from cloud_runtime.config import load_config
from conftest import make_npz_dataset
from edgefl_cli.interrupt import EXIT_INTERRUPTED, CtrlC
from edgefl_cli.simulation import run_in_memory

ROOT = Path(__file__).resolve().parents[1]


def tiny_overrides(data_dir, rounds=50):
    """Seconds per round on 2 cores: 2 devices of 60 images, a half-width server, stride-2 features."""
    return ["data.dataset=npz", f"data.path={data_dir}", "data.train_subset=null", "run.devices=2",
            f"run.rounds={rounds}", "edge.model_kwargs={stem_stride: 2}", "server.model_kwargs={width: 0.5}"]


@pytest.fixture
def small_npz(tmp_path):
    return make_npz_dataset(tmp_path / "small", n_train=120, n_test=40)


def spawn(args, tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    err = open(tmp_path / "stderr.log", "wb")
    return subprocess.Popen([sys.executable, "-m", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=err,
                            stdin=subprocess.DEVNULL), tmp_path / "stderr.log"


def wait_for(condition, proc, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc.poll() is not None:
            pytest.fail(f"exited with {proc.returncode} before {what}")
        time.sleep(0.1)
    pytest.fail(f"no {what} within {timeout}s")


def test_ctrl_c_stops_the_sim_and_writes_the_report_of_the_rounds_done(small_npz, tmp_path):
    out = tmp_path / "run"
    args = ["edgefl_cli.sim", "--config", "configs/quickstart.yaml", "--out", str(out), "--transport", "memory"]
    for item in tiny_overrides(small_npz):
        args += ["--set", item]
    proc, stderr = spawn(args, tmp_path)
    try:
        wait_for(lambda: (out / "runtime" / "report.json").exists(), proc, 60, "first round saved")
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the sim did not stop within 60 s of Ctrl-C")
    finally:
        if proc.poll() is None:
            proc.kill()
    err = stderr.read_text()
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "Ctrl-C again to stop at once" in err
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["interrupted"] is True and report["run"]["stopped"] is True
    assert 1 <= report["final"]["rounds"] < 50 and len(report["rounds"]) == report["final"]["rounds"]
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "runtime" / "accuracy.png").exists()
    assert f"interrupted after {report['final']['rounds']} of 50 rounds" in stdout.decode()


def test_ctrl_c_during_server_training_discards_that_round_only(small_npz, tmp_path, monkeypatch):
    """Stop lands mid-way through round 1's server training: the sim returns at once with round 0 reported,
    and the runtime's checkpoint is still the one after round 0 (a restart redoes round 1)."""
    from cloud_runtime import service
    stop, runtimes = threading.Event(), []
    real_build, real_update = service.build_runtime, progress.ProgressLog.update

    def build_runtime(*args, **kwargs):
        runtimes.append(real_build(*args, **kwargs))
        return runtimes[-1]

    def update(self, samples, loss=None):
        real_update(self, samples, loss)
        if self.label.startswith("server round 1 epoch"):
            stop.set()                # what the first Ctrl-C does ...
            runtimes[0].stop.set()    # ... and what the sim then tells the runtime (here before the next batch)
    monkeypatch.setattr(service, "build_runtime", build_runtime)
    monkeypatch.setattr(progress.ProgressLog, "update", update)
    cfg = load_config(ROOT / "configs/quickstart.yaml", tiny_overrides(small_npz, rounds=5) + ["server.batch_size=32"])
    report = run_in_memory(cfg, tmp_path / "run", stop)
    assert report["run"]["interrupted"] and [r["round"] for r in report["rounds"]] == [0]
    state = json.loads((tmp_path / "run" / "runtime" / "runtime.json").read_text())
    assert state["next_round"] == 1 and len(state["rows"]) == 1
    assert json.loads((tmp_path / "run" / "report.json").read_text())["final"]["rounds"] == 1


def test_ctrl_c_stops_cloud_runtime_serve_cleanly(tmp_path):
    state = tmp_path / "rt"
    config = tmp_path / "runtime.yaml"
    config.write_text(f"run_id: ctrlc\nbroker: {{url: 'memory://ctrlc'}}\nstate_dir: {state}\nrounds: 3\n"
                      "expected_devices: 2\n")
    proc, stderr = spawn(["edgefl_cli.runtime", "serve", "--config", str(config)], tmp_path)
    try:
        wait_for(lambda: "serving run" in stderr.read_text(), proc, 60, "the runtime serving")
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = stderr.read_text()
    assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "stopping: state saved at round 0" in err
    report = json.loads((state / "report.json").read_text())
    assert report["run"]["stopped"] is True and report["final"]["rounds"] == 0


def test_a_second_ctrl_c_stops_at_once():
    first = threading.Event()
    previous = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        with CtrlC(first.set, "stopping cleanly") as ctrl_c:
            os.kill(os.getpid(), signal.SIGINT)
            assert first.wait(5) and ctrl_c.pressed  # the first asks for a clean stop; nothing is raised
            os.kill(os.getpid(), signal.SIGINT)
            for _ in range(100):  # the handler runs on the main thread between bytecodes
                time.sleep(0.01)
            pytest.fail("the second Ctrl-C did not raise")
    assert signal.getsignal(signal.SIGINT) is previous  # restored


def _processes_mentioning(text: str, but: int) -> dict[int, str]:
    """PID -> command line of the processes (other than ``but``) whose command line holds ``text``."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and int(pid) != but:
            found[int(pid)] = cmdline
    return found


@pytest.mark.integration
@pytest.mark.system
def test_ctrl_c_stops_the_mqtt_sim_and_every_process_it_started(small_npz, tmp_path):
    out = tmp_path / "run"
    args = ["edgefl_cli.sim", "--config", "configs/quickstart.yaml", "--out", str(out)]
    for item in tiny_overrides(small_npz):
        args += ["--set", item]
    proc, stderr = spawn(args, tmp_path)
    try:
        wait_for(lambda: (out / "runtime" / "report.json").exists(), proc, 120, "first round saved")
        children = _processes_mentioning(str(out), but=proc.pid)
        assert len(children) == 4, children  # mosquitto, cloud-runtime, 2 edge-agents
        proc.send_signal(signal.SIGINT)  # to the sim only (a terminal's Ctrl-C reaches the whole process group)
        try:
            stdout, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("the sim did not stop within 90 s of Ctrl-C")
        err = stderr.read_text()
        assert proc.returncode == EXIT_INTERRUPTED, err[-3000:]
        assert "Traceback" not in err
        assert _processes_mentioning(str(out), but=proc.pid) == {}  # the broker and the agents were stopped too
    finally:  # a failed check leaves nothing running
        for pid in [proc.pid, *_processes_mentioning(str(out), but=proc.pid)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["interrupted"] is True and 1 <= report["final"]["rounds"] < 50
    assert (out / "accuracy.png").exists() and (out / "uploads.png").exists()
    for log in (out / "logs").glob("*.log"):
        assert "Traceback" not in log.read_text(), log
