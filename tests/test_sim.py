"""The in-process FedGKT simulator end to end on a small synthetic set (real data: bench/ and make quickstart)."""
import json
import threading

import pytest

from edgefl_cli.sim import main
from conftest import wait_until


def sim_args(npz_dir, out, *extra):
    return ["--config", "configs/quickstart.yaml", "--out", str(out), "--log-level", "WARNING", "--transport", "memory",
            "--set", "data.dataset=npz", "--set", f"data.path={npz_dir}", "--set", "data.train_subset=null",
            "--set", "run.devices=3", "--set", "run.rounds=3", "--set", "edge.model_kwargs={}",
            "--set", "server.lr=0.003", *extra]


def test_fedgkt_in_memory_learns_and_reports(npz_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(sim_args(npz_dir, out, "--set", "data.partition=hetero", "--set", "data.min_samples_per_device=20")) == 0
    report = json.loads((out / "report.json").read_text())
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    for row in report["rounds"]:
        assert row["seconds"] > 0 and set(row["edge"]) == {"dev0", "dev1", "dev2"}
        assert 0 <= row["test_accuracy"] <= 1 and set(row["per_device"]) == {"dev0", "dev1", "dev2"}
    final = report["final"]
    assert final["test_samples"] == 200  # shard mode: every test image once
    assert final["test_accuracy"] > 0.6, final  # 4 easy classes: chance is 0.25
    assert report["rounds"][1]["edge"]["dev0"]["kd_coverage"] == 1.0  # KD on every sample after round 0
    assert report["rounds"][0]["edge"]["dev0"]["kd_coverage"] == 0.0
    assert sum(d["train_samples"] for d in report["devices"].values()) == 400
    assert (out / "accuracy.png").stat().st_size > 1000
    assert (out / "partition.json").exists() and (out / "config.yaml").exists()
    assert "final test accuracy" in capsys.readouterr().out


def test_an_overlapped_evaluation_gives_the_figures_of_a_serial_one(npz_dir, tmp_path):
    rows = {}
    for overlap in (True, False):
        out = tmp_path / f"overlap-{overlap}"
        assert main(sim_args(npz_dir, out, "--set", f"fedgkt.overlap_evaluation={str(overlap).lower()}",
                             "--set", "run.threads=1")) == 0
        rows[overlap] = json.loads((out / "report.json").read_text())["rounds"]
    for key in ("test_accuracy", "test_loss", "per_device"):  # every round evaluated on the model after that round
        assert [r[key] for r in rows[True]] == [r[key] for r in rows[False]], key
    assert all(r["test_accuracy"] is not None and "evaluation" not in r for r in rows[True])


def test_an_overlapped_evaluation_takes_more_threads_once_the_serve_thread_waits_for_it():
    import threading
    import torch
    from cloud_runtime.strategies.fedgkt import Evaluation
    go, seen = threading.Event(), []

    class Server:
        def evaluate(self, uploads, round_, before_batch):
            for _ in range(2):
                before_batch()
                seen.append(torch.get_num_threads())
                go.wait(10)
            return "result"
    evaluation = Evaluation(Server(), [], {"round": 0})
    evaluation.start()
    wait_until(lambda: seen)
    evaluation.threads = 2   # what finish_evaluation sets (the runtime's threads) before it joins
    go.set()
    evaluation.join(10)
    assert seen == [1, 2] and evaluation.result == "result"


def test_full_test_split_evaluates_every_device_on_everything(npz_dir, tmp_path):
    out = tmp_path / "run"
    assert main(sim_args(npz_dir, out, "--set", "run.rounds=1", "--set", "data.test_split=full")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["final"]["test_samples"] == 600
    assert all(d["samples"] == 200 for d in report["rounds"][0]["per_device"].values())


@pytest.mark.parametrize("override, message", [
    ("edge.lrr=1", "unknown config key 'edge.lrr'"),
    ("edge.trainer=magic", "unknown trainer 'magic'"),
    ("data.path=/nonexistent", "does not exist"),
])
def test_bad_input_exits_2_with_a_named_error(npz_dir, tmp_path, caplog, override, message):
    args = sim_args(npz_dir, tmp_path / "run") + ["--set", override]
    assert main(args) == 2
    assert message in caplog.text


def test_memory_mode_runs_fedavg_with_the_real_runtime(npz_dir, tmp_path):
    """FedAvg was refused in memory mode before the one-engine redesign."""
    out = tmp_path / "fedavg"
    assert main(sim_args(npz_dir, out, "--set", "algorithm=fedavg", "--set", "edge.model=resnet8",
                         "--set", "run.rounds=2")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["transport"] == "memory" and report["run"]["strategy"] == "fedavg"
    assert len(report["rounds"]) == 2 and all(r["participants"] == ["dev0", "dev1", "dev2"] for r in report["rounds"])
    assert all(0 <= r["test_accuracy"] <= 1 and "stem.0.weight" in r["divergence"] for r in report["rounds"])
    assert report["final"]["bytes_up"] > 0 and not report["final"]["rejections"]


def test_memory_mode_runs_async_and_records_the_mode_that_ran(npz_dir, tmp_path):
    """deployment.mode=async was silently ignored in memory mode before; now the async strategy runs."""
    out = tmp_path / "async"
    assert main(sim_args(npz_dir, out, "--set", "deployment.mode=async", "--set", "run.rounds=4",
                         "--set", "deployment.max_staleness=3")) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["run"]["mode"] == "async" and report["run"]["strategy"] == "fedgkt_async"
    rows = report["rounds"]
    assert len(rows) == 4 and all("fresh" in r and "staleness" in r for r in rows)
    assert all(0 <= s <= 3 for r in rows for s in r["staleness"].values())
    assert report["final"]["test_accuracy"] is not None


def test_memory_mode_validates_uploads_like_mqtt(npz_dir, tmp_path):
    """Ingest checks run in memory mode too: a magnitude bound no honest upload meets rejects every upload,
    the devices end up quarantined, and the run stops at the deadline without a quorum (nothing trained)."""
    from cloud_runtime.config import load_config
    from edgefl_cli.simulation import write_deployment
    from cloud_runtime.service import build_runtime
    from edge_sdk.agent import build_agent
    from conftest import wait_until, wait_until

    cfg = load_config("configs/quickstart.yaml", ["data.dataset=npz", f"data.path={npz_dir}", "data.train_subset=null",
                                                  "run.devices=2", "run.rounds=1", "edge.model_kwargs={}"])
    deployment = write_deployment(cfg, tmp_path, "memory://validation-test")
    deployment.runtime.validation.max_abs_feature = 1e-6
    runtime = build_runtime(deployment.runtime)
    agents = [build_agent(a) for a in deployment.agents]
    runtime.start()
    for agent in agents:
        agent.start()
    wait_until(lambda: len(runtime.registry.devices) == 2, step=lambda: [runtime.pump(0.01)] + [a.pump(0.01) for a in agents])
    assert all(a.recipe is not None and a.recipe.codec == "int8" for a in agents)  # told by the runtime
    agent = agents[0]
    agent.pending_round = {"round": 0, "data": {"session": runtime.session, "eval": False}}
    serving = threading.Event()
    server = threading.Thread(target=lambda: [runtime.pump(0.01) for _ in iter(serving.is_set, True)])
    server.start()  # the agent's upload is done only when the runtime has answered it
    try:
        agent.run_round(agent.pending_round)
    finally:
        serving.set()
        server.join()
    assert runtime.registry.rejections["implausible_values"] >= 1
    assert not runtime.strategy.train_uploads and agent.progress.last_done == -1  # rejected: the round is not done
    for a in agents:
        a.shutdown()
    runtime.close()


def test_extractor_averaging_uses_the_runs_own_extractor_form(npz_dir, tmp_path):
    """With the run's input shape known, extractors are checked against the run's edge model; agents' real
    extractors fit it and every agent ends with the same (averaged) stem."""
    out = tmp_path / "avg"
    assert main(sim_args(npz_dir, out, "--set", "run.rounds=1", "--set", "fedgkt.average_extractors=true")) == 0
    report = json.loads((out / "report.json").read_text())
    assert not report["final"]["rejections"] and report["final"]["accepted_samples"] == 400
    # the extractors' layer divergence (eq. 1) before they were averaged, and its plot
    divergence = report["rounds"][0]["divergence"]
    assert divergence and all(v >= 0 for v in divergence.values()) and (out / "divergence.png").exists()


def test_the_thread_plan_shares_the_cores_and_warns_only_of_real_oversubscription(monkeypatch, caplog):
    import logging
    from cloud_runtime.config import load_config
    import edgefl_cli.simulation as sim
    from edgefl_core.proc import thread_plan
    assert thread_plan(2, 4, "sync") == (2, 1) and thread_plan(8, 2, "sync") == (8, 3)  # a core for the evaluation
    assert thread_plan(2, 1, "sync") == (2, 1) and thread_plan(8, 2, "sync", overlap_evaluation=False) == (8, 4)
    assert thread_plan(8, 3, "async") == (2, 2) and thread_plan(2, 4, "async", runtime_threads=3) == (3, 1)
    monkeypatch.setattr(sim, "usable_cores", lambda: 2)
    caplog.set_level(logging.INFO, "edgefl.sim")
    sim.log_thread_plan(load_config("configs/quickstart.yaml"))
    assert "runtime 2, each of 4 agents 1, on 2 cores" in caplog.text and "busy threads" not in caplog.text
    sim.log_thread_plan(load_config("configs/quickstart.yaml", ["deployment.agent_threads=2"]))
    assert "8 busy threads on 2 cores" in caplog.text


def test_a_run_started_beside_a_busy_process_plans_threads_for_the_cores_left(monkeypatch, caplog):
    """On 2 cores with another process keeping one busy, the quickstart's 2-thread server trained at 7 samples/s
    (a README walk-through): the plan is made for the cores other processes leave free as the run starts."""
    import logging
    import subprocess
    import sys
    from cloud_runtime.config import load_config
    import edgefl_cli.simulation as sim
    from edgefl_core.proc import busy_cores
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert busy_cores(1.0) >= 0.5  # a process spinning on one core is seen (this one's own time is not)
    finally:
        spinner.kill()
        spinner.wait()
    monkeypatch.setattr(sim, "usable_cores", lambda: 2)
    monkeypatch.setattr(sim, "busy_cores", lambda: 1.1)
    cores, busy = sim.free_cores()
    assert (cores, busy) == (1, 1.1) and sim.threads_of(load_config("configs/quickstart.yaml"), cores) == (1, 1)
    caplog.set_level(logging.INFO, "edgefl.sim")
    sim.log_thread_plan(load_config("configs/quickstart.yaml"), cores, busy)
    assert "runtime 1, each of 4 agents 1, on 1 cores (sync rounds); 1 more kept busy by other processes" in caplog.text
    monkeypatch.setattr(sim, "busy_cores", lambda: 0.3)  # a little background load leaves the plan alone
    assert sim.free_cores()[0] == 2
