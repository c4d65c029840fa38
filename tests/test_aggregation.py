"""Aggregators against straightforward NumPy references."""
import numpy as np
import pytest

from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from cloud_runtime.aggregation import (AGGREGATORS, AggregationError, clip_update, clipped_fedavg, coordinate_median,
                                       fedavg, layer_divergence, relative_layer_divergence, staleness_weights,
                                       tolerated_outliers, trimmed_mean, update_norm,
                                       updates_to_tolerate_one)


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


@pytest.mark.parametrize("aggregator, fraction", [("median", 0.1), ("trimmed_mean", 0.2), ("trimmed_mean", 0.3),
                                                  ("fedavg", 0.1)])
@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 10])
def test_tolerated_outliers_is_the_breakdown_point(aggregator, fraction, n):
    """With as many updates at 1e9 as the rule tolerates the aggregate stays among the honest values; one more
    moves it past them (what the runtime's warning that a rule is the mean over too few updates rests on)."""
    k = tolerated_outliers(aggregator, n, fraction)
    aggregate = AGGREGATORS.get(aggregator)
    for bad in (k, k + 1):
        if bad >= n:
            continue
        s = states(n)
        for i in range(bad):
            s[i] = {name: np.full_like(v, 1e9) for name, v in s[i].items()}
        got = np.abs(aggregate(s, None, {"trim_fraction": fraction})["fc.bias"]).max()
        assert (got < 10) == (bad == k), (bad, got)


@pytest.mark.parametrize("aggregator, fraction", [("median", 0.1), ("trimmed_mean", 0.2), ("trimmed_mean", 0.3),
                                                  ("trimmed_mean", 0.1), ("trimmed_mean", 1e-5), ("trimmed_mean", 0.0),
                                                  ("fedavg", 0.1)])
def test_updates_to_tolerate_one_is_the_first_count_that_does(aggregator, fraction):
    need = updates_to_tolerate_one(aggregator, fraction)
    if need is None:
        assert aggregator == "fedavg" or fraction == 0
        return
    assert tolerated_outliers(aggregator, need, fraction) == 1 and tolerated_outliers(aggregator, need - 1, fraction) == 0


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


def test_layer_divergence_is_eq_1_of_the_deeper_models_study_by_hand():
    """div(l) = (1/K) sum_k sqrt(||w_k(l) - w_avg(l)||^2 / d(l)), worked by hand for two clients."""
    a = {"w": np.array([1.0, 2.0, 3.0, 4.0]), "n": np.array(3)}
    b = {"w": np.array([3.0, 2.0, 1.0, 0.0]), "n": np.array(5)}
    # average (2, 2, 2, 2); a - avg = (-1, 0, 1, 2): ||.||^2 = 6; b - avg = (1, 0, -1, -2): 6; d = 4
    got = layer_divergence([a, b])
    assert got == {"w": pytest.approx(np.sqrt(6 / 4))}  # (sqrt(1.5) + sqrt(1.5)) / 2; the counter is skipped
    # against a given average (the aggregate a round actually produced), and weighted FedAvg as the default's kin
    assert layer_divergence([a, b], {"w": np.zeros(4), "n": np.array(0)})["w"] == pytest.approx(
        (np.sqrt(30 / 4) + np.sqrt(14 / 4)) / 2)
    assert layer_divergence([a, a])["w"] == 0


def test_relative_layer_divergence_keeps_the_earlier_scale_free_form():
    s = states(4)
    avg = fedavg(s)
    got = relative_layer_divergence(s)
    for name in s[0]:
        expected = np.mean([np.linalg.norm(x[name] - avg[name]) for x in s]) / np.linalg.norm(avg[name])
        assert got[name] == pytest.approx(expected, rel=1e-5)


def test_the_peer_frameworks_vector_two_clients_weights_1_and_2_identical_integers():
    """Flower's aggregate test (flwr/server/strategy/aggregate_test.py): identical int arrays from two clients
    weighted 1 and 2 must come back unchanged; with normalised weights 7/3 + 14/3 is 6.999999999999999 in
    float64, which a truncating cast turns into 6."""
    layers = [np.array([[1, 2, 3], [4, 5, 6]]), np.array([7, 8, 9, 10])]
    states_ = [{"l0": layers[0], "l1": layers[1]}, {"l0": layers[0].copy(), "l1": layers[1].copy()}]
    got = fedavg(states_, [1, 2])
    for name, expected in zip(("l0", "l1"), layers):
        assert got[name].dtype == expected.dtype
        np.testing.assert_array_equal(got[name], expected)
    assert int(7 * (1 / 3) + 7 * (2 / 3)) == 6  # the float64 sum a truncating cast got wrong (one element)


def test_integer_tensors_are_rounded_by_every_aggregator():
    a, b = {"n": np.array([10, 11], dtype=np.int64)}, {"n": np.array([11, 14], dtype=np.int64)}
    np.testing.assert_array_equal(fedavg([a, b], [1, 1])["n"], [10, 12])  # 10.5 and 12.5: half to even
    np.testing.assert_array_equal(coordinate_median([a, b])["n"], [10, 12])
    np.testing.assert_array_equal(trimmed_mean([a, b, a], 0.0)["n"], [10, 12])  # 10.33 -> 10, 12 -> 12
    assert fedavg([a, b], [1, 3])["n"].dtype == np.int64
    big = {"n": np.array([2**62 + 1, -(2**61) - 3], dtype=np.int64)}
    np.testing.assert_array_equal(fedavg([big, big], [1, 2])["n"], big["n"])  # past 2**53: still exact


DTYPES = [np.float16, np.float32, np.float64, np.int8, np.uint8, np.int32, np.int64, np.bool_]


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(DTYPES), data=st.data(), clients=st.integers(1, 5),
       weights=st.lists(st.floats(0.01, 1e6), min_size=5, max_size=5))
def test_averaging_identical_states_returns_them_unchanged(dtype, data, clients, weights):
    """Every aggregator, every dtype: n copies of one state come back bit for bit (dtype included)."""
    shape = data.draw(hnp.array_shapes(max_dims=3, max_side=4))
    elements = None
    if np.issubdtype(dtype, np.floating):
        elements = st.floats(-1e4, 1e4, width=np.finfo(dtype).bits, allow_nan=False, allow_infinity=False)
    state = {"t": data.draw(hnp.arrays(dtype, shape, elements=elements))}
    copies = [{"t": state["t"].copy()} for _ in range(clients)]
    results = {"clipped_fedavg": clipped_fedavg(copies, state, weights[:clients])[0]}
    for name in AGGREGATORS.names():
        results[name] = AGGREGATORS.get(name)(copies, weights[:clients], {"trim_fraction": 0.2})
    for name, got in results.items():
        assert got["t"].dtype == state["t"].dtype, name
        np.testing.assert_array_equal(got["t"], state["t"], err_msg=name)


def test_the_median_of_large_integers_is_exact():
    """np.median passed int64 through float64: hypothesis found 2**53 + 1 coming back as 2**53."""
    big = np.array([2 ** 53 + 1, -(2 ** 62) + 3], dtype=np.int64)
    for clients in (1, 2, 3, 4):
        got = coordinate_median([{"t": big.copy()} for _ in range(clients)])["t"]
        assert got.dtype == np.int64 and got.tolist() == big.tolist()
    pair = coordinate_median([{"t": np.array([2 ** 53 + 1])}, {"t": np.array([2 ** 53 + 3])}])["t"]
    assert pair.tolist() == [2 ** 53 + 2]


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
