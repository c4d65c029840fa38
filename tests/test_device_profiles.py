import functools
import json

import pytest
import yaml

from device_profiles import PROFILE_DIR, detect_host, list_profiles, load_profile
from edgefl_cli.profile import main as cli_main
from device_profiles.profiler import estimate_latency, model_cost
from edgefl_core.config import ConfigError


def test_flop_counts_match_hand_computed_convolutions():
    """resnet8_gkt on 1x8x8, FLOPs = 2 x MACs of every conv and linear (per sample)."""
    hw = 8 * 8
    stem = 2 * hw * 16 * (1 * 3 * 3)
    block1 = 2 * hw * (16 * 16 + 16 * 16 * 9 + 16 * 64 + 16 * 64)  # conv1, conv2, conv3, projection shortcut
    block2 = 2 * hw * (64 * 16 + 16 * 16 * 9 + 16 * 64)
    fc = 2 * 64 * 10
    cost = model_cost("resnet8_gkt", "backprop", batch=3, input_shape=(1, 8, 8))
    assert cost.forward_flops == 3 * (stem + block1 + block2 + fc)
    # backward: grad-input and grad-weight kernels (2x forward), except the stem, whose input needs no gradient
    assert cost.backward_flops == 3 * (stem + 2 * (block1 + block2 + fc))
    inference = model_cost("resnet8_gkt", "inference", batch=3, input_shape=(1, 8, 8))
    assert inference.backward_flops == 0 and inference.grad_bytes == 0 and inference.optimizer_bytes == 0


def test_inference_memory_counts_the_activations_alive_at_once():
    """Inference memory was the weights alone (``device-profile resnet8_gkt --batch 1 --method inference``
    printed 0.0 MiB): the activations alive at once count too, at least a block's 64-channel output and its
    input, fewer than backprop keeps for backward, linear in the batch."""
    one = model_cost("resnet8_gkt", "inference", batch=2, input_shape=(1, 8, 8))
    two = model_cost("resnet8_gkt", "inference", batch=4, input_shape=(1, 8, 8))
    train = model_cost("resnet8_gkt", "backprop", batch=2, input_shape=(1, 8, 8))
    block_output = 2 * 64 * 8 * 8 * 4
    assert 2 * block_output <= one.activation_bytes < train.activation_bytes
    assert two.activation_bytes == 2 * one.activation_bytes
    assert one.memory_bytes() == one.param_bytes + one.activation_bytes


def test_memory_accounting():
    sgd = model_cost("resnet8_gkt", "backprop", batch=4, input_shape=(3, 16, 16))
    adam = model_cost("resnet8_gkt", "backprop", batch=4, input_shape=(3, 16, 16), optimizer="adam")
    assert sgd.param_bytes == 10_586 * 4 == sgd.grad_bytes == sgd.optimizer_bytes
    assert adam.optimizer_bytes == 2 * sgd.param_bytes
    # saved activations grow linearly with the batch
    big = model_cost("resnet8_gkt", "backprop", batch=8, input_shape=(3, 16, 16))
    assert 1.8 < big.activation_bytes / sgd.activation_bytes < 2.2
    assert sgd.feature_shape == (16, 16, 16)
    assert sgd.upload_bytes_per_sample["int8"] < sgd.upload_bytes_per_sample["fp16"] < sgd.upload_bytes_per_sample["fp32"]


def test_compare_reproduces_fedgkt_edge_cost_claims(capsys):
    assert cli_main(["compare", "resnet8_gkt", "resnet56", "resnet110", "--json"]) == 0
    rows = {r["model"]: r for r in json.loads(capsys.readouterr().out)}
    assert {"model", "params", "train_flops"} <= set(rows["resnet56"])
    r56 = rows["resnet56"]["train_flops"] / rows["resnet8_gkt"]["train_flops"]
    r110 = rows["resnet110"]["train_flops"] / rows["resnet8_gkt"]["train_flops"]
    assert 8.5 <= r56 <= 10 and 16 <= r110 <= 18.5, (r56, r110)
    assert 50 <= rows["resnet56"]["params"] / rows["resnet8_gkt"]["params"] <= 60
    assert 100 <= rows["resnet110"]["params"] / rows["resnet8_gkt"]["params"] <= 115


def test_every_shipped_profile_loads_with_sources():
    names = list_profiles()
    assert len(names) >= 9 and "host" in names
    for name in names:
        profile = load_profile(name)
        assert profile.cpu.peak_gflops > 0 and profile.memory.bandwidth_gbs > 0
    assert detect_host().cpu.cores >= 1


def _write_profile(tmp_path, mutate):
    data = yaml.safe_load((PROFILE_DIR / "raspberry_pi_4.yaml").read_text())
    mutate(data)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("mutate, message", [
    (lambda d: d["memory"].pop("bandwidth_gbs"), r"memory.*bandwidth_gbs"),
    (lambda d: d["memory"].update(bandwidth_gbs=-4), r"memory\.bandwidth_gbs: must be > 0"),
    (lambda d: d["cpu"].update(turbo=True), r"unknown config key 'cpu\.turbo'"),
    (lambda d: d.update(colour="red"), r"unknown config key 'colour'"),
    (lambda d: d["efficiency"].update(torch_cpu=3), r"efficiency\.torch_cpu: must be in \(0, 1\]"),
    (lambda d: d["sources"].pop("peak_gflops"), r"sources: missing the source of 'peak_gflops'"),
])
def test_bad_profiles_name_the_problem(tmp_path, mutate, message):
    with pytest.raises(ConfigError, match=message):
        load_profile(_write_profile(tmp_path, mutate))


def test_unknown_profile_and_model(capsys):
    with pytest.raises(ConfigError, match="unknown device profile 'toaster'"):
        load_profile("toaster")
    assert cli_main(["resnet9000"]) == 2
    assert "unknown model 'resnet9000'" in capsys.readouterr().err


def test_roofline_estimate_and_band():
    cost = model_cost("resnet56", "backprop", batch=8, input_shape=(3, 16, 16))
    pi, orin = load_profile("raspberry_pi_4"), load_profile("jetson_agx_orin")
    est_pi, est_orin = estimate_latency(cost, pi), estimate_latency(cost, orin)
    assert est_pi["estimate_s"] > est_orin["estimate_s"]
    assert est_pi["low_s"] < est_pi["estimate_s"] < est_pi["high_s"]
    expected = cost.total_flops / (pi.cpu.peak_gflops * 1e9 * pi.efficiency.torch_cpu)
    memory = cost.moved_bytes() / (pi.memory.bandwidth_gbs * 1e9 * pi.efficiency.memory)
    assert est_pi["estimate_s"] == pytest.approx(expected + memory)
    with pytest.raises(ValueError, match="no efficiency"):
        estimate_latency(cost, pi, runtime="torch_gpu")


def test_cli_profile_all_devices_json_and_plot(tmp_path, capsys):
    plot = tmp_path / "p.png"
    assert cli_main(["resnet8_gkt", "--all-devices", "--batch", "4", "--input", "1x28x28", "--json",
                     "--plot", str(plot)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["method"] for r in rows} == {"inference", "backprop"}
    assert set(rows[0]["devices"]) == set(list_profiles())
    assert plot.stat().st_size > 1000


def test_runtime_device_cost_line():
    from device_profiles.cost_report import device_cost
    info = {"model": "resnet8_gkt", "batch_size": 8, "input_shape": [1, 12, 12], "model_kwargs": {},
            "optimizer": "adam", "profile": "raspberry_pi_4", "train_samples": 100, "test_samples": 50, "epochs": 2,
            "heartbeat": {"step_time_s": 0.05, "rss_mb": 300.0}, "bytes_up": 1000, "bytes_down": 10}
    cache = {}
    cost = device_cost(info, rounds_done=3, cache=cache)
    train = model_cost("resnet8_gkt", "backprop", 8, (1, 12, 12), optimizer="adam")
    infer = model_cost("resnet8_gkt", "inference", 8, (1, 12, 12))
    expected = 3 * (100 * 2 * train.total_flops / 8 + 150 * infer.total_flops / 8)
    assert cost["flops_spent"] == pytest.approx(expected)
    assert cost["profile"] == "raspberry_pi_4" and cost["measured_step_s"] == 0.05
    assert cost["prediction_error"] == pytest.approx(cost["predicted_step_s"] / 0.05 - 1)
    assert len(cache) == 1 and device_cost({"model": None}, 1, cache) is None
    assert cost["engine"] == "torch" and cost["predicted_runtime"] == "torch_cpu"  # no engine registered: torch
    assert cost["predicted_step_s"] == pytest.approx(
        estimate_latency(train, load_profile("raspberry_pi_4"), "torch_cpu")["estimate_s"])


def test_runtime_device_cost_line_names_the_engine_and_predicts_with_its_efficiency(tmp_path):
    from device_profiles.cost_report import device_cost
    info = {"model": "resnet8_gkt", "batch_size": 8, "input_shape": [1, 12, 12], "engine": "onnxruntime",
            "profile": "raspberry_pi_4", "train_samples": 100, "heartbeat": {"step_time_s": 0.05}}
    cache = {}
    cost = device_cost(info, 1, cache)
    train = model_cost("resnet8_gkt", "backprop", 8, (1, 12, 12))
    pi = load_profile("raspberry_pi_4")
    assert cost["engine"] == "onnxruntime" and cost["predicted_runtime"] == "onnxruntime_cpu"
    assert cost["predicted_step_s"] == pytest.approx(estimate_latency(train, pi, "onnxruntime_cpu")["estimate_s"])
    assert cost["predicted_step_s"] < device_cost({**info, "engine": "torch"}, 1, cache)["predicted_step_s"]
    # a profile without an onnxruntime efficiency: the torch one, and the line says so
    bare = _write_profile(tmp_path, lambda d: d["efficiency"].pop("onnxruntime_cpu"))
    cost = device_cost({**info, "profile": str(bare)}, 1, cache)
    assert cost["engine"] == "onnxruntime" and cost["predicted_runtime"] == "torch_cpu"
    assert cost["predicted_step_s"] == pytest.approx(estimate_latency(train, pi, "torch_cpu")["estimate_s"])


def test_cli_estimates_both_engines_per_device(capsys):
    assert cli_main(["resnet8_gkt", "--device", "raspberry_pi_4", "--device", "jetson_nano", "--batch", "4",
                     "--input", "1x8x8", "--engine", "both", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["method"], r["engine"]) for r in rows] == [("inference", "torch"), ("inference", "onnxruntime"),
                                                          ("backprop", "torch"), ("backprop", "onnxruntime")]
    torch_row, onnx_row = rows[2], rows[3]
    assert torch_row["total_flops"] == onnx_row["total_flops"]
    pi = load_profile("raspberry_pi_4")
    cost = model_cost("resnet8_gkt", "backprop", 4, (1, 8, 8))
    assert onnx_row["devices"]["raspberry_pi_4"]["runtime"] == "onnxruntime_cpu"
    assert onnx_row["devices"]["raspberry_pi_4"]["estimate_s"] == pytest.approx(
        estimate_latency(cost, pi, "onnxruntime_cpu")["estimate_s"])
    assert torch_row["devices"]["raspberry_pi_4"]["runtime"] == "torch_cpu"
    # the text output has an engine column
    assert cli_main(["resnet8_gkt", "--device", "raspberry_pi_4", "--batch", "4", "--input", "1x8x8", "--method",
                     "backprop", "--engine", "both"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["engine", "where", "ms/step"]
    assert lines[3].split()[:2] == ["torch", "raspberry_pi_4"] and lines[4].split()[:2] == ["onnxruntime", "raspberry_pi_4"]


def test_onnxruntime_rows_only_for_edge_models(capsys):
    assert cli_main(["resnet55_server", "--engine", "onnxruntime", "--batch", "2", "--input", "1x8x8"]) == 2
    assert "resnet55_server is a server model" in capsys.readouterr().err


def test_calibration_recovers_known_efficiencies():
    from device_profiles import Efficiency
    from edgefl_cli.profile import fit_efficiency
    host = detect_host()
    host.efficiency = Efficiency(torch_cpu=0.2, memory=1.5)
    rows = []
    for model in ("resnet8_gkt", "resnet56"):
        for method in ("inference", "backprop"):
            cost = model_cost(model, method, batch=4, input_shape=(3, 16, 16))
            rows.append({"cost": cost, "measured_s": estimate_latency(cost, host)["estimate_s"]})
    fitted = fit_efficiency(host, rows)
    assert fitted.torch_cpu == pytest.approx(0.2, rel=0.05) and fitted.memory == pytest.approx(1.5, rel=0.1)


def test_cli_measures_latency_and_peak_memory_here(capsys):
    assert cli_main(["resnet8_gkt", "--method", "backprop", "--batch", "8", "--input", "1x16x16", "--measure",
                     "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    here = row["measured_here"]
    assert here["median_s"] > 0 and here["peak_rss_mb"] >= here["baseline_rss_mb"] > 0 and here["step_rss_mb"] >= 0
    # next to the estimates: the measured step's FLOP/s against this host's measured fp32 peak
    assert here["peak_gflops"] > 0 and 0 < here["roofline_efficiency"] < 1.5
    assert here["achieved_gflops"] == pytest.approx(row["total_flops"] / here["median_s"] / 1e9, rel=0.01)


def test_model_kwargs_describe_the_configured_model(capsys):
    assert cli_main(["compare", "resnet8_gkt", "--batch", "2", "--input", "1x28x28", "--json"]) == 0
    default = json.loads(capsys.readouterr().out)[0]
    assert cli_main(["compare", "resnet8_gkt", "--batch", "2", "--input", "1x28x28", "--json",
                     "--model-kwargs", "{stem_stride: 2}"]) == 0
    strided = json.loads(capsys.readouterr().out)[0]  # the quickstart's edge model: a quarter of the work after the stem
    assert strided["train_flops"] < 0.35 * default["train_flops"]
    assert cli_main(["resnet8_gkt", "--batch", "2", "--input", "1x8x8", "--model-kwargs", "{stem_strid: 2}"]) == 2
    assert "stem_strid" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["resnet8_gkt", "--model-kwargs", "[1, 2]"])
    assert "expected a mapping" in capsys.readouterr().err


def test_compare_shows_progress_on_stderr_and_keeps_stdout_json(capsys):
    assert cli_main(["compare", "resnet8_gkt", "resnet8", "--batch", "2", "--input", "1x8x8", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["model"] for r in json.loads(out)] == ["resnet8_gkt", "resnet8"]  # stdout: the JSON alone
    lines = err.splitlines()
    assert lines[0].startswith("device-profile compare: [1/2] resnet8_gkt: FLOPs and memory of a backprop step, "
                               "batch 2, input 1x8x8 (elapsed ")
    assert lines[1].startswith("device-profile compare: [2/2] resnet8: ")
    assert lines[2].startswith("device-profile compare: done: 2 steps in ")


def test_measure_shows_each_measurement_on_stderr(capsys, monkeypatch):
    import edgefl_cli.profile as cli
    monkeypatch.setattr(cli, "list_models", lambda: ["resnet8_gkt", "resnet8"])
    monkeypatch.setattr(cli, "measure_bandwidth_gbs", lambda: 10.0)
    assert cli_main(["--measure", "--method", "inference", "--batch", "2", "--input", "1x8x8", "--json"]) == 0
    out, err = capsys.readouterr()
    assert [r["model"] for r in json.loads(out)["rows"]] == ["resnet8_gkt", "resnet8"]
    steps = [line for line in err.splitlines() if line.startswith("device-profile --measure: ")]
    host = detect_host().display_name
    assert steps[0].startswith(f"device-profile --measure: [1/4] memory bandwidth of {host}")
    assert steps[1].startswith(f"device-profile --measure: [2/4] fp32 peak of {host}")
    assert steps[2].startswith("device-profile --measure: [3/4] resnet8_gkt inference, batch 2, input 1x8x8: "
                               f"FLOPs, then the step time on {host} (elapsed ")
    assert steps[3].startswith("device-profile --measure: [4/4] resnet8 inference")
    assert steps[4].startswith("device-profile --measure: done: 4 steps in ")
    profile = json.loads(out)["profile"]  # the compute roof is measured, not derived from the CPU flags
    assert profile["sources"]["peak_gflops"].startswith("measured: ") and profile["cpu"]["peak_gflops"] > 0


def test_profile_with_measure_shows_each_measurement_on_stderr(capsys):
    assert cli_main(["resnet8_gkt", "--method", "inference", "--batch", "2", "--input", "1x8x8", "--measure",
                     "--device", "raspberry_pi_4", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["measured_here"]["median_s"] > 0
    what = "resnet8_gkt inference, batch 2, input 1x8x8"
    assert [line.split(": ", 2)[1] for line in err.splitlines()] == [f"[{i}/3] {what}" for i in (1, 2, 3)] + ["done"]
    assert "on device profile raspberry_pi_4" in err and "peak memory on this host" in err


def test_calibration_fits_the_onnxruntime_efficiency_sharing_the_memory_one(capsys, monkeypatch, tmp_path):
    """--measure --engine both: torch rows for every model, onnxruntime rows for edge models only; the saved
    profile gains a fitted onnxruntime_cpu (measurements stubbed by a host whose efficiencies are known)."""
    import edgefl_cli.profile as cli
    from device_profiles import Efficiency
    truth = detect_host()
    truth.memory.bandwidth_gbs = 10.0
    truth.efficiency = Efficiency(torch_cpu=0.2, onnxruntime_cpu=0.5, memory=1.5)
    compiled = []
    costs = functools.lru_cache(model_cost)

    def measured(model, method, batch, shape, engine):
        cost = costs(model, method, batch, cli._input_for(model, shape))
        return estimate_latency(cost, truth, f"{engine}_cpu")["estimate_s"]

    monkeypatch.setattr(cli, "list_models", lambda: ["resnet8_gkt", "resnet56", "resnet55_server"])
    monkeypatch.setattr(cli, "model_cost", costs)
    monkeypatch.setattr(cli, "measure_bandwidth_gbs", lambda: 10.0)
    monkeypatch.setattr(cli, "measure_peak_gflops", lambda threads=None: truth.cpu.peak_gflops)
    monkeypatch.setattr(cli, "measure_latency", lambda model, method, batch, shape: {
        "median_s": measured(model, method, batch, shape, "torch")})
    monkeypatch.setattr(cli, "compile_for_profile", lambda model, batch, shape, tmp: compiled.append(model) or (
        (model, shape), 1.0))
    monkeypatch.setattr(cli, "measure_program", lambda program, method, batch, threads: {
        "median_s": measured(program[0], method, batch, program[1], "onnxruntime")})
    saved = tmp_path / "host.yaml"
    assert cli_main(["--measure", "--engine", "both", "--batch", "4", "--input", "3x16x16", "--save-profile",
                     str(saved), "--json"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert compiled == ["resnet8_gkt", "resnet56"]  # no edge program of a server model
    assert [(r["model"], r["engine"]) for r in result["rows"] if r["method"] == "backprop"] == [
        ("resnet8_gkt", "torch"), ("resnet8_gkt", "onnxruntime"), ("resnet56", "torch"), ("resnet56", "onnxruntime"),
        ("resnet55_server", "torch")]
    profile = load_profile(saved)
    assert profile.efficiency.torch_cpu == pytest.approx(0.2, rel=0.05)
    assert profile.efficiency.onnxruntime_cpu == pytest.approx(0.5, rel=0.05)
    assert profile.efficiency.memory == pytest.approx(1.5, rel=0.1) and "onnxruntime steps" in profile.sources["efficiency"]
    assert "done: 14 steps in" in err  # bandwidth + 3 models x 2 methods (torch) + 2 compiles + 2 x 2 (onnxruntime)
    assert "resnet8_gkt, batch 4, input 3x16x16: compiling its edge program for onnxruntime" in err


def test_measured_peak_rss_is_the_fresh_process_not_its_parent():
    """getrusage's ru_maxrss of a child carries its parent's peak across fork + exec; VmHWM does not."""
    from device_profiles.profiler import measure_peak_rss
    ballast = bytearray(1200 << 20)
    ballast[::4096] = b"\1" * len(ballast[::4096])  # touch every page: the parent's peak grows by 1.2 GB
    parent = int(next(line for line in open("/proc/self/status") if line.startswith("VmHWM:")).split()[1]) / 1024
    child = measure_peak_rss("resnet8_gkt", "inference", 2, (1, 8, 8))
    del ballast
    assert child["peak_rss_mb"] < parent - 800, (child, parent)


@pytest.mark.skipif(not __import__("importlib").util.find_spec("onnxruntime"), reason="needs onnxruntime")
def test_cli_measures_both_engines_here(capsys):
    """The onnxruntime row really compiles the model and runs ProgramRunner, in a fresh process without torch."""
    assert cli_main(["resnet8_gkt", "--method", "backprop", "--batch", "8", "--input", "1x8x8", "--measure",
                     "--engine", "both", "--device", "raspberry_pi_4", "--json"]) == 0
    out, err = capsys.readouterr()
    rows = json.loads(out)
    assert [r["engine"] for r in rows] == ["torch", "onnxruntime"]
    here = {r["engine"]: r["measured_here"] for r in rows}
    for m in here.values():
        assert m["median_s"] > 0 and m["peak_rss_mb"] >= m["baseline_rss_mb"] > 0 and m["repeats"] == 15
    assert here["onnxruntime"]["compile_seconds"] > 0 and here["onnxruntime"]["threads"] == here["torch"]["threads"]
    # no torch in the device-side process: its whole footprint is well below torch's
    assert here["onnxruntime"]["peak_rss_mb"] < here["torch"]["peak_rss_mb"] - 100, here
    assert rows[1]["devices"]["raspberry_pi_4"]["runtime"] == "onnxruntime_cpu"
    steps = [line.split(": ", 2)[1].split()[0] for line in err.splitlines()]
    assert steps == [f"[{i}/5]" for i in range(1, 6)] + ["done"] and "(a fresh process, no torch)" in err


def test_a_model_option_of_the_wrong_type_is_a_named_error(capsys):
    assert cli_main(["resnet8_gkt", "--batch", "2", "--input", "1x8x8", "--model-kwargs", "{stem_stride: x}"]) == 2
    assert "--model-kwargs" in capsys.readouterr().err


def test_profiling_leaves_other_threads_models_alone():
    """torch's MemTracker, first used for inference memory, hooks every module of the process: an agent
    thread's forward under it raised KeyError, and the in-memory simulation (which profiles devices while
    agents train) failed in CI. What profiles must see only its own thread."""
    import threading
    import torch
    from model_zoo import create_model
    other = create_model("resnet8_gkt", num_classes=10, in_channels=1).train()
    errors, stop = [], threading.Event()

    def train():
        try:
            while not stop.is_set():
                other(torch.randn(32, 1, 28, 28))[0].sum().backward()  # forwards that straddle the profiling
        except Exception as e:  # noqa: BLE001 (what the test reports)
            errors.append(e)

    worker = threading.Thread(target=train)
    worker.start()
    try:
        for _ in range(20):
            model_cost("resnet8_gkt", "inference", batch=2, input_shape=(1, 8, 8))
    finally:
        stop.set()
        worker.join()
    assert not errors, errors
