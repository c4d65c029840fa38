"""A real ``edge-agent`` on ``engine: onnxruntime`` trains through rounds over mosquitto beside a torch agent
(a mixed fleet), gets its edge program from the runtime, and never imports torch."""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
import yaml

from cloud_runtime.config import load_runtime_config
from cloud_runtime.service import build_runtime
from conftest import make_npz_dataset

pytestmark = pytest.mark.integration

WRAPPER = """
import atexit, json, sys
def dump():
    heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'onnxscript', 'model_zoo'))
    open(sys.argv[1], 'w').write(json.dumps(heavy))
atexit.register(dump)
from edgefl_cli.agent import main
sys.exit(main(['--config', sys.argv[2]]))
"""


def agent_yaml(tmp_path, name, engine, data, url):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "device_id": name, "run_id": "onnx", "engine": engine, "threads": 1, "broker": {"url": url},
        "data": {"dataset": "npz", "path": str(data)}, "state_dir": str(tmp_path / f"{name}-state"),
        "heartbeat_s": 2.0}))
    return path


def test_onnxruntime_agent_trains_over_mosquitto_without_torch_in_a_mixed_fleet(broker, tmp_path):
    data_a = make_npz_dataset(tmp_path / "a", n_train=160, n_test=40, seed=1)
    data_b = make_npz_dataset(tmp_path / "b", n_train=160, n_test=40, seed=2)
    cfg = load_runtime_config(None, [
        "run_id=onnx", f"broker.url={broker.url}", f"state_dir={tmp_path / 'rt'}", "rounds=2", "min_devices=2",
        "expected_devices=2", "num_classes=4", "input_shape=[1,12,12]", "edge.batch_size=32", "edge.optimizer=adam",
        "edge.lr=0.003", "server.batch_size=32", "round_deadline_s=600",
        "registration_timeout_s=600", "threads=1", "eval_every=1"])
    runtime = build_runtime(cfg)
    result: dict = {}
    serving = threading.Thread(target=lambda: result.update(report=runtime.serve()), daemon=True)
    serving.start()
    procs = {}
    try:
        for name, engine, data in (("ort0", "onnxruntime", data_a), ("pt0", "torch", data_b)):
            log = open(tmp_path / f"{name}.log", "w")
            procs[name] = (subprocess.Popen([sys.executable, "-c", WRAPPER, str(tmp_path / f"{name}.modules"),
                                             str(agent_yaml(tmp_path, name, engine, data, broker.url))],
                                            stdout=log, stderr=subprocess.STDOUT), log)
        serving.join(600)
        assert not serving.is_alive(), "the run did not finish"
        for name, (proc, log) in procs.items():
            assert proc.wait(60) == 0, (tmp_path / f"{name}.log").read_text()[-3000:]
    finally:
        runtime.stop.set()
        for proc, log in procs.values():
            if proc.poll() is None:
                proc.kill()
            log.close()
    ort_log = (tmp_path / "ort0.log").read_text()
    assert "Traceback" not in ort_log and "edge program" in ort_log and "loaded; engine onnxruntime" in ort_log
    assert json.loads((tmp_path / "ort0.modules").read_text()) == []  # torch never entered the process
    assert "torch" in json.loads((tmp_path / "pt0.modules").read_text())
    report = result["report"]
    assert [r["round"] for r in report["rounds"]] == [0, 1]
    for r in report["rounds"]:
        assert sorted(r["participants"]) == ["ort0", "pt0"]
    assert report["devices"]["ort0"]["engine"] == "onnxruntime" and report["devices"]["pt0"]["engine"] == "torch"
    (program,) = report["run"]["edge_programs"]
    assert program["error"] is None and program["bytes"] > 10_000 and program["compile_seconds"] > 0
    assert not report["devices"]["ort0"].get("rejections") and not report["devices"]["pt0"].get("rejections")
