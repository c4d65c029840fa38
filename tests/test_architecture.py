"""The layering promises of docs/ARCHITECTURE.md, checked: import-linter contracts and a torch-free core."""
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold():
    exe = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    assert exe, "import-linter is a dev dependency (pip install -e '.[dev]')"
    result = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    contracts = (ROOT / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    assert f"Contracts: {contracts} kept, 0 broken." in result.stdout, result.stdout[-2000:]


def test_the_shared_core_imports_without_torch():
    code = ("import edgefl_core, edgefl_core.wire, edgefl_core.codecs, edgefl_core.chunking, edgefl_core.config, "
            "edgefl_core.registry, edgefl_core.transport, edgefl_core.transport.mqtt, edgefl_core.transport.memory, edgefl_core.transport.inbox, "
            "edgefl_core.data.datasets, edgefl_core.data.partition, edgefl_core.data.federated, "
            "edgefl_core.data.local, edgefl_core.data.config, sys; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_a_device_on_onnxruntime_imports_without_torch():
    """The agent, its CLI, the onnxruntime engine and a recipe validated as such a device validates it."""
    code = ("import sys, dataclasses; import edge_sdk.agent, edgefl_cli.agent, edge_sdk.engines.onnx_engine, "
            "edge_sdk.program.runner, edge_sdk.program.cache; "
            "from edge_sdk.config import RunRecipe, without_code_checks; "
            "from edgefl_core.config import build_dataclass; "
            "from edge_sdk.engines import engine_class; engine_class('onnxruntime'); "
            "ctx = without_code_checks(); ctx.__enter__(); "
            "build_dataclass(RunRecipe, {'edge': {'model': 'resnet8_gkt', 'trainer': 'fg_weight', "
            "'trainer_kwargs': {'exact_classifier': True}}}); ctx.__exit__(None, None, None); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_the_installed_packages_do_not_ship_dev_tooling():
    text = (ROOT / "pyproject.toml").read_text()
    include = text.split("[tool.setuptools.packages.find]")[1].split("\n")[1]
    assert "tools" not in include and "bench" not in include
