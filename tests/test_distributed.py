"""Server training on torch.distributed (cloud_runtime/distributed.py): the shard plan, the global-batch
BatchNorm, and real torchrun launches of 2 Gloo ranks against one process."""
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from cloud_runtime.distributed import RankShard, convert_batchnorm, launched, split_batches
from cloud_runtime.features import FeatureStore, HeldUpload, features_from_arrays
from cloud_runtime.server_trainer import batches
from edgefl_core.codecs import feature_codec

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "jobs" / "dist_server.py"


def test_every_global_batch_is_cut_into_one_contiguous_part_per_rank():
    order = np.random.default_rng(0).permutation(353)
    global_batches = batches(order, 32, min_last=2)
    parts = split_batches(global_batches, 2)
    assert [len(p) for p in parts[0]] == [16] * 10 + [17] and [len(p) for p in parts[1]] == [16] * 10 + [16]
    for k, batch in enumerate(global_batches):  # rank 0's part, then rank 1's: the batch itself, in order
        assert np.array_equal(np.concatenate([parts[0][k], parts[1][k]]), batch)
    assert np.array_equal(np.sort(np.concatenate(parts[0] + parts[1])), np.arange(353))
    with pytest.raises(ValueError, match="cannot give each of 4 ranks a row"):
        split_batches([np.arange(3)], 4)


def test_a_last_batch_too_small_for_the_ranks_joins_the_one_before():
    assert [len(b) for b in batches(np.arange(65), 32)] == [32, 33]      # one process: only a batch of 1 joins
    assert [len(b) for b in batches(np.arange(67), 32)] == [32, 32, 3]
    assert [len(b) for b in batches(np.arange(67), 32, min_last=4)] == [32, 35]
    assert [len(b) for b in batches(np.arange(68), 32, min_last=4)] == [32, 32, 4]


def test_launched_reads_torchruns_environment():
    assert launched({}) is None and launched({"WORLD_SIZE": "1", "RANK": "0"}) is None
    got = launched({"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2",
                    "TORCHELASTIC_RESTART_COUNT": "3"})
    assert (got.rank, got.world_size, got.local_rank, got.local_world_size, got.restart) == (1, 2, 1, 2, 3)
    assert not got.coordinator
    with pytest.raises(ValueError, match="RANK 5 outside WORLD_SIZE 2"):
        launched({"WORLD_SIZE": "2", "RANK": "5"})
    with pytest.raises(ValueError, match="malformed"):
        launched({"WORLD_SIZE": "2"})


def test_a_rank_gets_its_rows_compact_and_dequantizes_them_as_the_store_does():
    rng = np.random.default_rng(1)
    store = FeatureStore(None)
    for d, n in (("b", 30), ("a", 20)):
        x = rng.normal(0, 3, (n, 4, 3, 3)).astype(np.float32)
        store.put(HeldUpload(d, 0, "train", np.arange(n, dtype=np.int64), features_from_arrays(
            feature_codec("int8").encode(x), "int8"), rng.normal(size=(n, 5)).astype(np.float16),
            rng.integers(0, 5, n), {}))
    devices, offsets = store.layout()
    index = rng.permutation(50)[:17]
    data, scale, low, teacher, labels = store.gather(index, devices, offsets)
    assert data.dtype == np.uint8 and scale.shape == low.shape == (17, 4)   # 1 byte a value, not 4
    shard = RankShard(data, scale, low, teacher, labels, index, np.array([0, 17]), np.array([17]))
    features, want_teacher, want_labels = store.batch(index, devices, offsets)
    assert np.array_equal(shard.features(0, 17), features)                  # bit for bit
    assert np.array_equal(teacher, want_teacher) and np.array_equal(labels, want_labels)


def test_converted_batchnorm_keeps_the_same_tensors_and_state_dict_keys():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    before = model.state_dict()
    weight = model[1].weight
    convert_batchnorm(model, "cpu")
    assert type(model[1]).__name__ == "GlobalBatchNorm2d" and type(model[2][0]).__name__ == "GlobalBatchNorm2d"
    assert model[1].weight is weight and list(model.state_dict()) == list(before)
    x = torch.randn(6, 3, 5, 5)
    plain = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Sequential(nn.BatchNorm2d(4)))
    plain.load_state_dict(before)
    assert torch.allclose(model(x), plain(x), atol=1e-6)   # one process: plain BatchNorm, statistics and all
    assert torch.allclose(model[1].running_var, plain[1].running_var)


def run_job(out, *args, ranks=None, timeout=240):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if ranks is None:
        cmd = [sys.executable, str(JOB), str(out), *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
               str(JOB), str(out), *args]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return np.load(out), done.stdout + done.stderr


@pytest.mark.integration
@pytest.mark.parametrize("soft_labels", ["last_epoch", pytest.param("eval_pass", marks=pytest.mark.system)])
def test_two_gloo_ranks_train_what_one_process_trains(tmp_path, soft_labels):
    """ResNet-55 on 353 int8 rows of 2 devices, 2 rounds of 2 epochs, global batch 32 (a last batch of 33 cut
    17/16), KD on: the same soft labels, loss and model as one process, up to summation order."""
    one, _ = run_job(tmp_path / "one.npz", "--soft-labels", soft_labels)
    two, log = run_job(tmp_path / "two.npz", "--soft-labels", soft_labels, ranks=2)
    assert "rank 1: round 1, 352 samples" in log    # its half of each batch (16 each, 10 x 16 + 16), 2 epochs
    for round_ in (0, 1):
        for device in ("dev-a", "dev-b"):
            assert np.array_equal(one[f"r{round_}/{device}/ids"], two[f"r{round_}/{device}/ids"])
            np.testing.assert_allclose(two[f"r{round_}/{device}/logits"], one[f"r{round_}/{device}/logits"],
                                       atol=5e-3)
        np.testing.assert_allclose(two[f"r{round_}/stats"], one[f"r{round_}/stats"], rtol=1e-3)
    for key in one.files:
        if key.startswith("model/") and one[key].dtype.kind == "f":
            np.testing.assert_allclose(two[key], one[key], atol=5e-2, rtol=1e-2, err_msg=key)
        elif key.startswith("model/"):
            assert np.array_equal(two[key], one[key]), key     # num_batches_tracked: the same steps


@pytest.mark.integration
@pytest.mark.system
def test_a_stop_mid_round_reaches_every_rank_and_the_launch_ends(tmp_path):
    got, log = run_job(tmp_path / "stopped.npz", "--stop-after", "5", ranks=2, timeout=180)
    assert list(got["interrupted"]) == [1, 5]       # round 1, after its 5th global batch
    assert "rank 1: round 1" in log and "(stopped)" in log and "the coordinator ended the run" in log


@pytest.mark.integration
@pytest.mark.system
def test_a_coordinator_failing_mid_round_ends_the_launch_at_once_not_after_the_collective_timeout(tmp_path):
    """The ranks wait in a collective for the shards the coordinator failed to make: leaving the group (no
    stop posted into a collective they are not in) drops their connections, so the launch ends in seconds
    and torchrun can restart it, instead of every rank waiting out dist_timeout_s (600 s here)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(JOB),
           str(tmp_path / "failed.npz"), "--fail-at-round", "1"]
    start = time.monotonic()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    log = done.stdout + done.stderr
    assert done.returncode != 0 and "planning the shards (injected)" in log, log[-3000:]
    assert "rank 1: round 0" in log and "the training ranks had left" not in log
    assert time.monotonic() - start < 120


def test_a_launch_refuses_what_its_ranks_cannot_train():
    from types import SimpleNamespace
    from cloud_runtime.service import check_launch
    from edgefl_core.config import ConfigError
    launch = launched({"WORLD_SIZE": "4", "RANK": "0"})
    with pytest.raises(ConfigError, match="WORLD_SIZE: 4 ranks train FedGKT's server model; fedavg has none"):
        check_launch(SimpleNamespace(algorithm="fedavg", server=SimpleNamespace(batch_size=64)), launch)
    with pytest.raises(ConfigError, match=r"4 ranks need server.batch_size >= 4 \(a row of every batch each\), got 2"):
        check_launch(SimpleNamespace(algorithm="fedgkt", server=SimpleNamespace(batch_size=2)), launch)
    check_launch(SimpleNamespace(algorithm="fedgkt", server=SimpleNamespace(batch_size=4)), launch)


def test_the_simulator_refuses_ranks_it_cannot_use_before_starting_anything():
    from cloud_runtime.config import load_config
    from edgefl_core.config import ConfigError
    with pytest.raises(ConfigError, match="deployment.server_ranks: 2 ranks train FedGKT's server model; fedavg"):
        load_config("configs/quickstart.yaml", ["algorithm=fedavg", "deployment.server_ranks=2"])
    with pytest.raises(ConfigError, match="need server.batch_size >= 4"):
        load_config("configs/quickstart.yaml", ["server.batch_size=2", "deployment.server_ranks=4"])
    with pytest.raises(ConfigError, match="server_ranks"):
        load_config("configs/quickstart.yaml", ["deployment.server_ranks=0"])
