"""Aggregators against straightforward NumPy references."""
import numpy as np
import pytest

from cloud_runtime.aggregation import (AggregationError, clip_update, clipped_fedavg, coordinate_median, fedavg,
                                       layer_divergence, staleness_weights, trimmed_mean, update_norm)


def states(n=5, seed=0):
    rng = np.random.default_rng(seed)
    return [{"conv.weight": rng.normal(size=(4, 3, 3, 3)).astype(np.float32),
             "fc.bias": rng.normal(size=10).astype(np.float32)} for _ in range(n)]


def test_fedavg_weighted_by_sample_count():
    s, w = states(), [10, 20, 30, 0, 40]
    got = fedavg(s, w)
    for name in s[0]:
        expected = np.average(np.stack([x[name] for x in s]), axis=0, weights=w)
        np.testing.assert_allclose(got[name], expected, rtol=1e-6)
        assert got[name].dtype == np.float32
    np.testing.assert_allclose(fedavg(s)["fc.bias"], np.mean([x["fc.bias"] for x in s], axis=0), rtol=1e-6)


def test_median_and_trimmed_mean():
    s = states(7)
    np.testing.assert_allclose(coordinate_median(s)["conv.weight"], np.median([x["conv.weight"] for x in s], axis=0))
    stacked = np.sort(np.stack([x["fc.bias"] for x in s]), axis=0)
    np.testing.assert_allclose(trimmed_mean(s, 0.2)["fc.bias"], stacked[1:6].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(trimmed_mean(s, 0.0)["fc.bias"], fedavg(s)["fc.bias"], rtol=1e-5)


def test_robust_aggregators_resist_an_outlier():
    s = states(5)
    s[2] = {k: v * 1e6 for k, v in s[2].items()}
    mean_err = np.abs(fedavg(s)["fc.bias"]).max()
    assert np.abs(coordinate_median(s)["fc.bias"]).max() < 10 < mean_err
    assert np.abs(trimmed_mean(s, 0.2)["fc.bias"]).max() < 10


def test_norm_clipping():
    ref = {"w": np.zeros(4, np.float32)}
    big = {"w": np.array([3, 4, 0, 0], np.float32)}
    assert update_norm(big, ref) == pytest.approx(5.0)
    np.testing.assert_allclose(clip_update(big, ref, 1.0)["w"], [0.6, 0.8, 0, 0], rtol=1e-6)
    np.testing.assert_allclose(clip_update(big, ref, 10.0)["w"], big["w"])
    honest = [{"w": np.full(4, v, np.float32)} for v in (0.1, 0.2, 0.15)]
    scaled = {"w": np.full(4, 1000.0, np.float32)}  # a wildly scaled update
    avg, norms = clipped_fedavg(honest + [scaled], ref)
    assert norms[-1] > 100 * norms[0] and np.abs(avg["w"]).max() < 0.5


def test_staleness_weights():
    np.testing.assert_allclose(staleness_weights([0, 3, 8]), [1.0, 0.5, 1 / 3])
    with pytest.raises(AggregationError):
        staleness_weights([-1])


def test_layer_divergence_reference():
    s = states(4)
    avg = fedavg(s)
    got = layer_divergence(s)
    for name in s[0]:
        expected = np.mean([np.linalg.norm(x[name] - avg[name]) for x in s]) / np.linalg.norm(avg[name])
        assert got[name] == pytest.approx(expected, rel=1e-5)
    assert layer_divergence([s[0], s[0]])["fc.bias"] == 0


@pytest.mark.parametrize("call, message", [
    (lambda: fedavg([]), "no client models"),
    (lambda: fedavg(states(2), [0, 0]), "sum to 0"),
    (lambda: fedavg(states(2), [1, -1]), ">= 0"),
    (lambda: fedavg(states(2), [1]), "2 client models but 1 weights"),
    (lambda: fedavg([states(1)[0], {"conv.weight": np.zeros((4, 3, 3, 3)), "fc.bias": np.zeros(9)}]),
     r"client 1: fc.bias has shape \(9,\)"),
    (lambda: fedavg([states(1)[0], {"conv.weight": np.zeros((4, 3, 3, 3))}]), "client 1: tensor names differ"),
    (lambda: fedavg([states(1)[0], {k: v * np.nan for k, v in states(1)[0].items()}]), "NaN or Inf"),
    (lambda: coordinate_median([]), "no client models"),
    (lambda: trimmed_mean(states(3), 0.5), "trim_fraction"),
])
def test_bad_rounds_are_clear_errors(call, message):
    with pytest.raises(AggregationError, match=message):
        call()


def test_average_torch_states_keeps_integer_buffers_integral():
    import torch
    from cloud_runtime.aggregation import average_torch_states
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(4)}
    b = {"w": torch.tensor([3.0, 5.0]), "n": torch.tensor(7)}
    avg = average_torch_states([a, b], [1, 3])
    assert torch.allclose(avg["w"], torch.tensor([2.5, 4.5])) and avg["n"].dtype == torch.int64 and int(avg["n"]) == 6
