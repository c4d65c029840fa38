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
    assert inference.backward_flops == 0 and inference.activation_bytes == 0 and inference.grad_bytes == 0


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
    assert steps[0].startswith(f"device-profile --measure: [1/3] memory bandwidth of {host}")
    assert steps[1].startswith("device-profile --measure: [2/3] resnet8_gkt inference, batch 2, input 1x8x8: "
                               f"FLOPs, then the step time on {host} (elapsed ")
    assert steps[2].startswith("device-profile --measure: [3/3] resnet8 inference")
    assert steps[3].startswith("device-profile --measure: done: 3 steps in ")


def test_profile_with_measure_shows_each_measurement_on_stderr(capsys):
    assert cli_main(["resnet8_gkt", "--method", "inference", "--batch", "2", "--input", "1x8x8", "--measure",
                     "--device", "raspberry_pi_4", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["measured_here"]["median_s"] > 0
    what = "resnet8_gkt inference, batch 2, input 1x8x8"
    assert [line.split(": ", 2)[1] for line in err.splitlines()] == [f"[{i}/3] {what}" for i in (1, 2, 3)] + ["done"]
    assert "on device profile raspberry_pi_4" in err and "peak memory on this host" in err
