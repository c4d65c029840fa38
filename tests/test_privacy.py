"""Feature privacy (issue 20): the Gaussian mechanism's mechanics on the device, the accountant's ε against
the exact privacy curve of the Gaussian mechanism, the config's rules, and a run that applies it end to end."""
import json
import math

import numpy as np
import pytest

from cloud_runtime.config import PrivacyConfig, RuntimeConfig
from cloud_runtime.privacy import calibrate_noise, epsilon, run_privacy
from edge_sdk.privacy import clip_per_sample, privatize_features
from edgefl_core.config import ConfigError, build_dataclass


def features(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return (np.abs(rng.standard_normal((n, 4, 6, 6))) * rng.uniform(0.1, 5, (n, 1, 1, 1))).astype(np.float32)


def test_clipping_bounds_every_sample_and_leaves_small_ones_alone():
    f = features()
    norms = np.linalg.norm(f.reshape(len(f), -1), axis=1)
    clip = float(np.median(norms))
    out = clip_per_sample(f, clip)
    out_norms = np.linalg.norm(out.reshape(len(out), -1), axis=1)
    assert out.dtype == np.float32 and out.shape == f.shape
    assert (out_norms <= clip * (1 + 1e-6)).all()
    small = norms <= clip
    assert small.any() and np.array_equal(out[small], f[small])
    assert np.allclose(out_norms[~small], clip, rtol=1e-5)  # big ones land on the bound, direction kept
    assert np.allclose(out[~small] / out_norms[~small, None, None, None],
                       f[~small] / norms[~small, None, None, None], atol=1e-6)


def test_clipping_holds_for_arrays_in_any_memory_layout():
    """Features in channels-last layout (a torch extractor's output) were once left unclipped: the per-row view
    of a non-C-contiguous copy is itself a copy, so scaling it changed nothing."""
    f = features()
    channels_last = np.ascontiguousarray(f.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)   # N x C x H x W view
    assert not channels_last.flags.c_contiguous and np.array_equal(channels_last, f)
    out = privatize_features(channels_last, 1.0, 0.0)
    assert np.allclose(np.linalg.norm(out.reshape(len(out), -1), axis=1), 1.0, rtol=1e-5)


def test_noise_has_the_configured_scale_and_comes_from_os_entropy():
    f = features(n=256)
    clip, sigma = 2.0, 0.75
    out = privatize_features(f, clip, sigma, np.random.default_rng(1))
    noise = out - clip_per_sample(f, clip)
    assert abs(noise.std() / (sigma * clip) - 1) < 0.02 and abs(noise.mean()) < 4 * sigma * clip / noise.size ** 0.5
    assert not np.array_equal(privatize_features(f, clip, sigma), privatize_features(f, clip, sigma))
    assert privatize_features(f, None, 0.0) is f  # off
    for bad in ((0.0, 1.0), (-1.0, 0.0), (1.0, -0.1), (float("nan"), 1.0)):
        with pytest.raises(ValueError, match="clip_norm must be > 0"):
            privatize_features(f, *bad)


def _exact_delta(eps: float, mu: float) -> float:
    """The Gaussian mechanism's exact privacy curve (Balle & Wang, ICML 2018, Thm. 8): R releases of noise
    σ·C with sensitivity 2C (replace one sample, both clipped to C) are one Gaussian mechanism of μ = 2√R / σ."""
    from scipy.stats import norm
    return norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * norm.cdf(-eps / mu - mu / 2)


@pytest.mark.parametrize("sigma, releases", [(1.6, 1), (2.0, 6), (4.0, 6), (8.0, 20)])
def test_accountant_epsilon_matches_the_exact_gaussian_curve(sigma, releases):
    from scipy.optimize import brentq
    delta = 1e-5
    mu = 2 * math.sqrt(releases) / sigma
    exact = brentq(lambda e: _exact_delta(e, mu) - delta, 1e-6, 500)
    got = epsilon(sigma, releases, delta)
    assert exact <= got <= exact * 1.02 + 1e-3  # sound (never below the truth) and tight
    assert _exact_delta(got, mu) <= delta * (1 + 1e-6)


def test_epsilon_at_many_releases_is_exact_and_costs_no_more_than_at_a_few():
    """One device re-sending changed bytes raised its release count at will, and the privacy-loss-distribution
    accountant grew with it in time and memory: 23 s of the serve thread at 10,000 releases, a MemoryError at
    20,000 (found by reviews with a valid device credential). ε is now the analytic Gaussian mechanism's for the
    composed multiplier, checked here against the exact curve at 10^6 releases (which the accountant could not
    compute at all)."""
    from scipy.optimize import brentq
    delta, sigma, releases = 1e-5, 200.0, 1_000_000  # mu = 10: the test's exact curve stays in range
    mu = 2 * math.sqrt(releases) / sigma
    exact = brentq(lambda e: _exact_delta(e, mu) - delta, 1e-6, 500)
    epsilon.cache_clear()
    assert exact <= epsilon(sigma, releases, delta) <= exact * (1 + 1e-6)
    assert epsilon(2.0, 100_000, 1e-5) > epsilon(2.0, 1_000, 1e-5) > epsilon(2.0, 6, 1e-5)


def test_calibrated_noise_meets_the_target_epsilon_tightly():
    for target in (2.0, 8.0):
        sigma = calibrate_noise(target, 1e-5, 6)
        assert 0.97 * target <= epsilon(sigma, 6, 1e-5) <= target
    assert epsilon(0.0, 3, 1e-5) == float("inf") and epsilon(1.0, 0, 1e-5) == 0.0
    with pytest.raises(ValueError):
        calibrate_noise(0.0, 1e-5, 6)


@pytest.mark.parametrize("settings, message", [
    ({"noise_multiplier": 1.0}, "need clip_norm"),
    ({"clip_norm": 1.0, "noise_multiplier": 1.0, "epsilon": 8.0}, "not both"),
    ({"clip_norm": -1.0}, "clip_norm"),
    ({"clip_norm": 1.0, "delta": 0.5}, "delta"),
])
def test_privacy_config_errors_name_the_key(settings, message):
    with pytest.raises(ConfigError, match=message):
        build_dataclass(RuntimeConfig, {"privacy": settings})


def test_the_recipe_carries_the_calibrated_noise_and_the_report_its_epsilon():
    cfg = build_dataclass(RuntimeConfig, {"rounds": 6, "privacy": {"clip_norm": 3.0, "epsilon": 8.0}})
    mechanism = cfg.recipe_for("dev0").privacy
    assert mechanism.clip_norm == 3.0 and mechanism.noise_multiplier == calibrate_noise(8.0, 1e-5, 6)
    devices = {"dev0": {"feature_releases": [f"{i:016x}" for i in range(7)]}, "dev1": {"feature_releases": ["a"]}}
    report = run_privacy(cfg, devices)
    assert report["enabled"] and report["releases"] == 7  # dev0 went up 7 times: more than planned, reported
    assert report["epsilon_run"] == epsilon(mechanism.noise_multiplier, 7, 1e-5) > 8.0
    assert run_privacy(build_dataclass(RuntimeConfig, {}), devices) == {"enabled": False}
    with pytest.raises(ConfigError, match="FedGKT"):
        build_dataclass(RuntimeConfig, {"algorithm": "fedavg", "privacy": {"clip_norm": 1.0}})
    assert PrivacyConfig().recipe(6).clip_norm is None


def test_devices_upload_clipped_features_and_the_report_says_so(npz_dir, tmp_path, monkeypatch):
    """A memory-mode run with feature privacy on: every feature map that leaves a device is within the
    clipping bound, and report.json records the mechanism (σ = 0: no ε bound, reported as null)."""
    import edge_sdk.wire as wire
    from edgefl_cli.sim import main
    from test_sim import sim_args
    sent, original = [], wire.upload_blob

    def spy(upload, codec, extractor=None):
        sent.append(np.linalg.norm(upload.features.reshape(len(upload.features), -1), axis=1))
        return original(upload, codec, extractor)
    monkeypatch.setattr(wire, "upload_blob", spy)
    out = tmp_path / "run"
    assert main(sim_args(npz_dir, out, "--set", "run.rounds=2", "--set", "privacy.clip_norm=0.5")) == 0
    assert len(sent) >= 6 and all((n <= 0.5 * (1 + 1e-5)).all() for n in sent)
    report = json.loads((out / "report.json").read_text())
    privacy = report["run"]["privacy"]
    assert privacy["enabled"] and privacy["clip_norm"] == 0.5 and privacy["releases"] == 2
    assert privacy["epsilon_run"] is None and "not labels" in privacy["covers"]
    assert all(d["feature_releases"] == 2 for d in report["devices"].values())


def test_a_resend_is_the_same_release_and_new_features_get_fresh_noise(tmp_path):
    """Re-sending a round (restart, new runtime session, rejection) must not hand the server a second,
    independently noised copy of the same features: averaging copies would remove the noise."""
    from edge_sdk.privacy import device_key, noise_rng
    key = device_key(tmp_path)
    assert len(key) == 32 and device_key(tmp_path) == key and (tmp_path / "privacy.key").stat().st_mode & 0o777 == 0o600
    f = features()
    once = privatize_features(f, 2.0, 1.0, noise_rng(key, f))
    again = privatize_features(f, 2.0, 1.0, noise_rng(key, f))
    assert np.array_equal(once, again)  # the same features: the same release, whatever round or instance
    other = f.copy()
    other[0, 0, 0, 0] += 1e-3  # retrained features: a new release with noise independent of the first
    noise_a = once - clip_per_sample(f, 2.0)
    noise_b = privatize_features(other, 2.0, 1.0, noise_rng(key, other)) - clip_per_sample(other, 2.0)
    assert abs(np.corrcoef(noise_a.ravel(), noise_b.ravel())[0, 1]) < 0.05
    assert not np.array_equal(once, privatize_features(f, 2.0, 1.0, noise_rng(device_key(tmp_path / "b"), f)))


def test_the_runtime_counts_distinct_payloads_as_releases(tmp_path):
    from cloud_runtime.ingest import Ingest
    from cloud_runtime.registry import DeviceRegistry
    cfg = RuntimeConfig()
    registry = DeviceRegistry(cfg)
    registry.devices["dev0"] = {}
    ingest = Ingest(cfg, registry)
    for blob in (b"round0", b"round0", b"round1"):  # a re-send of round 0 is no new release
        ingest.note_release("dev0", blob)
    assert len(registry.devices["dev0"]["feature_releases"]) == 2


def test_a_damaged_privacy_key_is_replaced_loudly(tmp_path, caplog):
    from edge_sdk.privacy import device_key
    (tmp_path / "privacy.key").write_bytes(b"short")
    key = device_key(tmp_path)
    assert len(key) == 32 and device_key(tmp_path) == key
    assert "holds 5 bytes, not 32" in caplog.text
