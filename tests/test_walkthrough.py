"""docs/DEPLOYMENT.md, run as written: every ``sh`` block in order, ``# terminal`` blocks as background
processes, on loopback with TLS and per-device ACLs, each device on its own data (issue 14)."""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import requires_fashion_mnist, wait_with_progress

pytestmark = [pytest.mark.integration, pytest.mark.system, requires_fashion_mnist]
DOC = Path(__file__).resolve().parents[1] / "docs" / "DEPLOYMENT.md"


def shell_blocks(text: str) -> list[str]:
    return [m.group(1).strip() for m in re.finditer(r"```sh\n(.*?)```", text, re.S)]


def wait_for_the_run(background: dict) -> None:
    """The runtime ends the run and exits 0; then every device exits 0."""
    runtime, runtime_log = background["the cloud runtime"]
    logs = [log for _, log in background.values()]
    assert wait_with_progress(runtime, logs, stall_s=300, limit_s=2400) == 0, runtime_log.read_text()[-4000:]
    for name, (proc, log) in background.items():
        if name.startswith("device"):
            assert wait_with_progress(proc, [log], stall_s=120, limit_s=300) == 0, log.read_text()[-3000:]


def test_the_doc_has_the_walkthrough_blocks():
    blocks = shell_blocks(DOC.read_text())
    assert blocks[0].startswith("cloud-runtime provision")
    assert sum(b.startswith("# terminal") for b in blocks) == 4


@pytest.fixture
def workdir():
    """An empty folder the broker's account can enter: as root, mosquitto drops to user mosquitto, and
    pytest's own tmp folders are private to the user running the tests."""
    path = Path(tempfile.mkdtemp(prefix="edgefl-walkthrough-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_the_deployment_walkthrough_runs_as_written(workdir):
    tmp_path = workdir
    with socket.socket() as s:  # the doc's port
        if s.connect_ex(("127.0.0.1", 18883)) == 0:
            pytest.fail("port 18883 (docs/DEPLOYMENT.md's broker) is in use on this machine")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PATH=f"{Path(sys.executable).parent}:{os.environ['PATH']}")
    background: dict[str, tuple[subprocess.Popen, Path]] = {}
    try:
        for block in shell_blocks(DOC.read_text()):
            first = block.splitlines()[0]
            if first.startswith("# terminal"):
                name = first.split(":", 1)[1].strip()
                log = tmp_path / f"{re.sub(r'[^a-z0-9]+', '-', name.lower())[:40]}.log"
                background[name] = (subprocess.Popen(["bash", "-ec", block], cwd=tmp_path, env=env,
                                                     stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                                                     start_new_session=True), log)
                continue
            if background:  # a command after the terminals is for once the run has ended (the broker stays up)
                wait_for_the_run(background)
            done = subprocess.run(["bash", "-ec", block], cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=600)
            assert done.returncode == 0, f"{block}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
            if "report.json" in block:
                print(done.stdout)
        wait_for_the_run(background)
    finally:
        for proc, _ in background.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
    texts = {name: log.read_text() for name, (_, log) in background.items()}
    for name, text in texts.items():
        assert "Traceback" not in text, (name, text[-3000:])
    runtime_text = texts["the cloud runtime"]
    assert "stale_round" not in runtime_text and "re-registered" not in runtime_text
    for name in ("device pi-01 (on a real device: in the folder its bundle was copied into)", "device pi-02"):
        assert "re-sending round" not in texts[name]
        assert "fingerprint sha256:" in texts[name]  # the device said what data it trains on
    report = json.loads((tmp_path / "deploy/runtime/state/report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    assert report["final"]["test_accuracy"] >= 0.38  # the doc's 0.435 (of 400 test images) less 22 images
    assert report["devices"]["pi-01"]["train_samples"] == report["devices"]["pi-02"]["train_samples"] == 1000
    for row in report["rounds"]:
        assert set(row["bytes_up"]) == {"pi-01", "pi-02"} and min(row["bytes_up"].values()) > 0
        assert sum(row["bytes_rejected"].values()) == 0  # a clean run: nothing refused
    assert report["final"]["bytes_up"] == sum(sum(row["bytes_up"].values()) for row in report["rounds"])
