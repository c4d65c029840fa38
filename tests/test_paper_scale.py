"""The paper-scale path (configs/table1_gpu.yaml: CIFAR-10, 16 devices, ResNet-8 -> ResNet-55, FedML's stride-1
models, 100 rounds on a GPU) runs as written on a small generated set in CIFAR-10's python layout: the same
config, shrunk by overrides to 2 devices and 1 round on the CPU. No CIFAR-10 copy exists here; a user with one
runs the documented command (docs/AGGREGATION.md)."""
import json
from pathlib import Path

import numpy as np
import pytest

from cloud_runtime.config import load_config
from edgefl_cli.simulation import run_in_memory
from test_data import make_cifar_py

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.system  # about a minute of stride-1 ResNet-55 on the CPU


def test_the_table1_gpu_config_trains_on_a_cifar_layout_set(tmp_path):
    data = make_cifar_py(tmp_path / "cifar", n=40)  # 200 training and 40 test images, 10 classes
    cfg = load_config(ROOT / "configs" / "table1_gpu.yaml", [
        f"data.path={data}", "run.devices=2", "run.rounds=1", "run.eval_every=1", "data.partition=homo",
        "server.batch_size=32", "edge.batch_size=32", "console.enabled=false", "deployment.quorum=1.0"])
    assert (cfg.data.dataset, cfg.run.devices, cfg.edge.model, cfg.server.model) == ("cifar10", 2, "resnet8_gkt",
                                                                                     "resnet55_server")
    report = run_in_memory(cfg, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "report.json").read_text())
    assert saved["final"]["accepted_samples"] == 200 and report["final"]["test_samples"] == 2 * 40  # test_split: full
    assert 0 <= report["final"]["test_accuracy"] <= 1 and not report["final"]["rejections"]
    runtime_yaml = (tmp_path / "out" / "runtime.yaml").read_text()
    assert "input_shape:\n- 3\n- 32\n- 32" in runtime_yaml and "num_classes: 10" in runtime_yaml
    assert np.isfinite(report["rounds"][0]["server"]["loss"])
