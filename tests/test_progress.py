"""Long cloud compute shows progress: server training logs a line at most every INTERVAL_S seconds plus one
per epoch, evaluation only when it is slow; a stop request interrupts both between batches."""
import logging
import threading

import numpy as np
import pytest
import torch
import torch.nn as nn

from cloud_runtime import progress
from cloud_runtime.config import ServerConfig, load_runtime_config
from cloud_runtime.progress import Interrupted, ProgressLog
from cloud_runtime.server_trainer import GKTServer
from cloud_runtime.service import CloudRuntime
from edge_sdk.messages import FeatureUpload
from edgefl_core.transport import MemoryBus

LOG = logging.getLogger("test.progress")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def lines(caplog, name=None):
    return [r.getMessage() for r in caplog.records if name is None or r.name == name]


def test_a_line_at_most_every_interval_then_a_closing_one(caplog):
    caplog.set_level(logging.INFO)
    clock = Clock()
    meter = ProgressLog(LOG, "server round 3 epoch 1/2", 30_000, after=30_000, clock=clock)
    for _ in range(4):           # 2 s, 512 samples per batch: nothing yet
        clock.now += 2.0
        meter.update(512, 0.9)
    assert lines(caplog) == []
    clock.now += 2.0             # 10 s in
    meter.update(10_752, 0.81)   # 12,800 samples done
    assert lines(caplog) == ["server round 3 epoch 1/2: 12,800/30,000 samples (43%), 1,280 samples/s, ETA 13 s, "
                             "all epochs ETA 37 s, loss 0.81"]
    clock.now += 9.0             # the next line is due 10 s after the last one
    meter.update(8_000, 0.7)
    assert len(lines(caplog)) == 1
    clock.now += 1.0
    meter.update(100, 0.7)
    assert len(lines(caplog)) == 2 and "20,900/30,000 samples (70%)" in lines(caplog)[-1]
    clock.now += 3.5
    meter.update(9_100)
    meter.finish(0.654)
    assert lines(caplog)[-1] == "server round 3 epoch 1/2: 30,000/30,000 samples (100%), 1,277 samples/s, " \
                                "took 24 s, loss 0.654"


def test_a_quiet_compute_speaks_only_when_slow(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    clock = Clock()
    quick = ProgressLog(LOG, "eval", 100, quiet=True, clock=clock)
    clock.now += 1.0
    quick.update(100)
    quick.finish()
    assert lines(caplog) == []
    slow = ProgressLog(LOG, "eval", 100, quiet=True, clock=clock)
    clock.now += progress.QUIET_S + 0.5
    slow.update(60)
    slow.finish()
    assert lines(caplog) == ["eval: 60/100 samples (60%), 11 samples/s, took 5.5 s"]  # timed lines: every 10 s
    assert progress.duration(75) == "1 min 15 s" and progress.duration(3725) == "1 h 02 min"


def tiny_server(epochs=2, batch_size=16, **kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
    return GKTServer(model, ServerConfig(epochs=epochs, batch_size=batch_size, device="cpu", **kw), 3)


def upload(device="d0", n=40, split="train", first=0):
    g = torch.Generator().manual_seed(first)
    return FeatureUpload(device, 0, split, np.arange(first, first + n, dtype=np.int64),
                         torch.rand(n, 4, 3, 3, generator=g), torch.randn(n, 3, generator=g),
                         torch.randint(0, 3, (n,), generator=g))


def test_server_training_logs_each_epoch_and_timed_lines(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    server = tiny_server()
    server.ingest(upload("d0"))
    server.ingest(upload("d1", first=100))
    server.train_round(3)  # default interval: quick epochs give one closing line each
    got = lines(caplog, "cloud_runtime.server_trainer")
    assert [g.split(":")[0] for g in got] == ["server round 3 epoch 1/2", "server round 3 epoch 2/2"]
    assert all("80/80 samples (100%)" in g and "samples/s, took " in g and ", loss " in g for g in got), got

    caplog.clear()
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)  # a line after every batch (16, 32, 48, 64, 80 samples)
    server.train_round(4)
    got = lines(caplog, "cloud_runtime.server_trainer")
    assert len(got) == 2 * 6, got
    assert got[0].startswith("server round 4 epoch 1/2: 16/80 samples (20%), ") and "ETA" in got[0]
    assert "all epochs ETA" in got[0] and "all epochs ETA" not in got[7]  # the last epoch: its own ETA only
    assert got[5].startswith("server round 4 epoch 1/2: 80/80 samples (100%)") and "took" in got[5]


def test_evaluation_logs_progress_only_when_slow(caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    server = tiny_server()
    server.ingest(upload())
    tests = [upload("d0", 30, "test", 500), upload("d1", 30, "test", 600)]
    server.evaluate(tests, round_=2)
    assert lines(caplog, "cloud_runtime.server_trainer") == []
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    result = server.evaluate(tests, round_=2)
    got = lines(caplog, "cloud_runtime.server_trainer")
    assert got[0].startswith("server round 2 evaluation: 30/60 samples (50%)")
    assert got[-1].startswith("server round 2 evaluation: 60/60 samples (100%)")
    assert got[-1].endswith(f"loss {result.loss:.3g}")


def test_a_stop_request_interrupts_training_and_evaluation_between_batches():
    server = tiny_server(epochs=3)
    server.ingest(upload())
    stop = threading.Event()
    batches = []

    def count(n):
        batches.append(n)
        if len(batches) == 4:
            stop.set()
    with pytest.raises(Interrupted, match="server round 1 epoch 2/3 at 16/40 samples"):
        server.train_round(1, progress=count, stop=stop)
    assert len(batches) == 4  # epoch 1's three batches, one of epoch 2, then nothing
    with pytest.raises(Interrupted, match="evaluation"):
        server.evaluate([upload("d0", 10, "test", 500)], round_=1, stop=stop)
    assert server.model.training  # left ready to train again


def test_fedavg_evaluation_logs_progress_and_stops(npz_dir, tmp_path, caplog, monkeypatch):
    caplog.set_level(logging.INFO)
    cfg = load_runtime_config(None, ["run_id=p", f"state_dir={tmp_path / 'rt'}", "algorithm=fedavg",
                                     "eval_data.dataset=npz", f"eval_data.path={npz_dir}", "edge.model=resnet8"])
    rt = CloudRuntime(cfg, MemoryBus().client("runtime"))
    rt.strategy.setup(4, [1, 12, 12], 16)
    monkeypatch.setattr(progress, "QUIET_S", 0.0)
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    row = {"round": 5}
    rt.strategy.evaluate(row)
    got = [g for g in lines(caplog, "edgefl.runtime") if "evaluation" in g]
    assert len(got) == 2 and all(g.startswith("round 5 evaluation of the global model: 200/200 samples (100%), ")
                                 for g in got), got
    assert "ETA" in got[0] and "took" in got[1] and got[1].endswith(f"loss {row['test_loss']:.3g}")
    rt.stop.set()
    with pytest.raises(Interrupted):
        rt.strategy.evaluate({"round": 6})
