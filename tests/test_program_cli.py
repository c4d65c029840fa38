"""Offline delivery of edge programs (air-gapped devices on engine onnxruntime): ``cloud-runtime program build``
compiles the program of a runtime config into the runtime's own cache (so the runtime announces that digest)
and a file; ``edge-agent program install`` checks the file and caches it on a device, torch-free."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from edgefl_cli.agent import main as agent_main
from edgefl_cli.runtime import main as runtime_main

RUNTIME_YAML = """\
run_id: offline
num_classes: 4
input_shape: [1, 12, 12]
edge:
  batch_size: 16
state_dir: state
"""
# subprocesses run this checkout (not another install of the package)
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                               os.environ.get("PYTHONPATH")) if p)}
AGENT_YAML = """\
device_id: pi-1
run_id: offline
engine: onnxruntime
data:
  dataset: npz
  path: data
state_dir: agent-state
"""


def _json(text: str):
    return json.loads(text)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One build (a compile of ~25 s in its own process), reused by every test of this module."""
    root = tmp_path_factory.mktemp("offline")
    (root / "runtime.yaml").write_text(RUNTIME_YAML)
    out = root / "prog.edgeprog"
    proc = subprocess.run([sys.executable, "-m", "edgefl_cli.runtime", "program", "build", "--config",
                           str(root / "runtime.yaml"), "--out", str(out)], capture_output=True, text=True,
                          timeout=600, env=ENV)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compiling in a separate process" in proc.stderr
    return root, out, _json(proc.stdout)


class FakeDownlink:
    def __init__(self):
        self.recipe, self.sent = {}, []

    def send(self, device, kind, round_, **extra):
        self.sent.append((device, kind))

    def send_transfer(self, device, blob, round_, meta):
        self.sent.append((device, meta["kind"], meta["digest"], blob))


def test_build_fills_the_runtime_cache_the_runtime_then_announces(built):
    from cloud_runtime.config import load_runtime_config
    from cloud_runtime.edge_programs import EdgePrograms
    from edge_sdk.program.format import program_digest

    root, out, about = built
    blob = out.read_bytes()
    assert about["digest"] == program_digest(blob) and about["bytes"] == len(blob) > 10_000
    assert about["cached"] is False and about["compile_seconds"] > 1
    assert about["trainer"] == "backprop" and about["model"] == "resnet8_gkt"
    assert about["num_classes"] == 4 and about["input_shape"] == [1, 12, 12]
    assert about["graphs"] == ["extract", "train_step"] and about["out"] == str(out)
    cached = Path(about["runtime_cache"])
    assert cached.parent == root / "state" / "edge_programs" and cached.read_bytes() == blob
    # the runtime of this config finds the file under the key it computes itself: it announces and sends it
    # without compiling anything
    cfg = load_runtime_config(root / "runtime.yaml")
    downlink = FakeDownlink()
    programs = EdgePrograms(cfg.state_dir, {None: cfg.recipe_for()}, downlink, lambda: 0, "s", cfg.seed)
    programs.on_register("pi-1", {"engine": "onnxruntime"}, cfg.num_classes, cfg.input_shape)
    assert downlink.recipe["edge_programs"] == [about["digest"]]
    assert programs.report()[0]["cached"] is True
    assert ("pi-1", "edge_program", about["digest"], blob) in downlink.sent
    programs.on_register("pi-2", {"engine": "onnxruntime", "program": about["digest"]}, 4, [1, 12, 12])
    assert not [s for s in downlink.sent if s[0] == "pi-2"]  # a device that has it (installed) gets no transfer


def test_build_again_reuses_the_cache_and_writes_into_a_folder(built, tmp_path, capsys):
    root, _, about = built
    assert runtime_main(["program", "build", "--config", str(root / "runtime.yaml"), "--out", str(tmp_path),
                         "--log-level", "WARNING"]) == 0
    again = _json(capsys.readouterr().out)
    assert again["digest"] == about["digest"] and again["cached"] is True and again["compile_seconds"] == 0
    assert again["out"] == str(tmp_path / f"{about['digest']}.edgeprog")
    assert Path(again["out"]).read_bytes() == Path(about["runtime_cache"]).read_bytes()


def _agent_dir(tmp_path: Path) -> Path:
    (tmp_path / "agent.yaml").write_text(AGENT_YAML)
    return tmp_path / "agent.yaml"


TORCH_FREE = ("import sys\n"
              "from edgefl_cli.agent import main\n"
              "rc = main(sys.argv[1:])\n"
              "print('TORCH LOADED' if 'torch' in sys.modules else 'torch-free', file=sys.stderr)\n"
              "sys.exit(rc)\n")


def test_install_on_a_device_is_torch_free_and_list_shows_it(built, tmp_path, capsys):
    _, out, about = built
    agent_yaml = _agent_dir(tmp_path)
    proc = subprocess.run([sys.executable, "-c", TORCH_FREE, "program", "install", str(out), "--config",
                           str(agent_yaml)], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.strip().endswith("torch-free"), proc.stderr
    installed = _json(proc.stdout)
    assert installed["digest"] == about["digest"] and installed["trainer"] == "backprop"
    assert installed["graphs"] == ["extract", "train_step"] and installed["bytes"] == about["bytes"]
    assert installed["model"] == "resnet8_gkt" and installed["num_classes"] == 4
    cached = tmp_path / "agent-state" / "programs" / f"{about['digest']}.edgeprog"
    assert Path(installed["path"]) == cached and cached.read_bytes() == out.read_bytes()
    # what the agent's cache loads at start (edge_sdk.agent: ProgramCache(state_dir / "programs"))
    from edge_sdk.program.cache import ProgramCache
    assert ProgramCache(tmp_path / "agent-state" / "programs").load(about["digest"]) == out.read_bytes()

    assert agent_main(["program", "list", "--config", str(agent_yaml)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1 and lines[0].startswith(about["digest"]) and "backprop" in lines[0]
    assert "resnet8_gkt" in lines[0] and "1x12x12" in lines[0]
    # a damaged file in the cache is listed as refused, never silently
    (cached.parent / f"{'0' * 64}.edgeprog").write_bytes(b"junk")
    assert agent_main(["program", "list", "--config", str(agent_yaml), "--json"]) == 0
    rows = {r["digest"]: r for r in _json(capsys.readouterr().out)}
    assert rows[about["digest"]]["trainer"] == "backprop" and "refused" not in rows[about["digest"]]
    assert "damaged" in rows["0" * 64]["refused"]


def test_list_of_an_empty_cache(tmp_path, capsys):
    assert agent_main(["program", "list", "--config", str(_agent_dir(tmp_path))]) == 0
    out, err = capsys.readouterr()
    assert out == "" and "no edge programs in" in err


def test_bad_files_are_refused_with_a_message_and_no_traceback(built, tmp_path):
    _, out, _ = built
    agent_yaml = _agent_dir(tmp_path)
    junk = tmp_path / "junk.edgeprog"
    junk.write_bytes(os.urandom(5000))
    truncated = tmp_path / "truncated.edgeprog"
    truncated.write_bytes(out.read_bytes()[:-100])
    for path, message in ((junk, "edge program is not a safetensors blob"),
                          (truncated, "edge program is not a safetensors blob"),
                          (tmp_path / "missing.edgeprog", "No such file or directory")):
        proc = subprocess.run([sys.executable, "-c", TORCH_FREE, "program", "install", str(path), "--config",
                               str(agent_yaml)], capture_output=True, text=True, timeout=120, env=ENV)
        assert proc.returncode == 2, (path, proc.stderr)
        assert "edge-agent program install: " in proc.stderr and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "agent-state" / "programs").exists() or \
        not list((tmp_path / "agent-state" / "programs").iterdir())


def test_a_program_with_a_custom_operator_is_refused(built, tmp_path, capsys):
    import onnx

    from edge_sdk.program.format import pack_program, unpack_program
    _, out, _ = built
    program = unpack_program(out.read_bytes())
    graph = onnx.ModelProto.FromString(program.graphs["extract"])
    graph.opset_import.add(domain="com.vendor", version=1)
    program.graphs["extract"] = graph.SerializeToString()
    evil = tmp_path / "evil.edgeprog"
    evil.write_bytes(pack_program(program))
    assert agent_main(["program", "install", str(evil), "--config", str(_agent_dir(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert "imports operator domain 'com.vendor'" in err


def test_a_trainer_without_a_graph_is_refused(tmp_path, caplog):
    (tmp_path / "runtime.yaml").write_text(RUNTIME_YAML)
    with caplog.at_level(logging.ERROR):
        assert runtime_main(["program", "build", "--config", str(tmp_path / "runtime.yaml"), "--set",
                             "edge.trainer=async_fgd", "--out", str(tmp_path / "p.edgeprog")]) == 2
    assert "edge.trainer=async_fgd" in caplog.text and "onnxruntime engine cannot run it" in caplog.text
    assert "pipeline of in-flight batches" in caplog.text  # why (edge_sdk.program.spec.WHY_NOT)
    assert not (tmp_path / "p.edgeprog").exists() and not (tmp_path / "state").exists()


def test_a_device_override_trainer_is_named(tmp_path, caplog):
    (tmp_path / "runtime.yaml").write_text(RUNTIME_YAML + "edge_overrides:\n  pi-9: {trainer: fg_local_guess}\n")
    with caplog.at_level(logging.ERROR):
        assert runtime_main(["program", "build", "--config", str(tmp_path / "runtime.yaml"), "--device", "pi-9",
                             "--out", str(tmp_path / "p.edgeprog")]) == 2
    assert "edge_overrides.pi-9.trainer=fg_local_guess" in caplog.text


def test_build_needs_the_runs_classes_and_image_shape(tmp_path, caplog):
    (tmp_path / "runtime.yaml").write_text("edge:\n  batch_size: 16\n")
    with caplog.at_level(logging.ERROR):
        assert runtime_main(["program", "build", "--config", str(tmp_path / "runtime.yaml"),
                             "--out", str(tmp_path / "p.edgeprog")]) == 2
    assert "num_classes and input_shape must be set in the runtime config" in caplog.text


def test_help_of_the_program_commands(capsys):
    for main, argv in ((runtime_main, ["program", "build", "--help"]), (agent_main, ["program", "install", "--help"]),
                       (agent_main, ["program", "list", "--help"])):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert "--config" in text and "(default: None)" not in text and "(default: [])" not in text
