"""The cloud's compact feature store: checks on the wire form, batches gathered without concatenation,
segments memory-mapped beyond a byte budget, each sample held once."""
import numpy as np
import pytest
import torch

from cloud_runtime.features import FeatureStore, HeldUpload, features_from_arrays
from edge_sdk.messages import MessageError
from edgefl_core.codecs import decode_features, encode_features


def _held(device, n, seed, codec="int8", k=10, c=4, hw=3):
    rng = np.random.default_rng(seed)
    x = np.maximum(rng.standard_normal((n, c, hw, hw)).astype(np.float32), 0) * (seed + 1)
    arrays = encode_features(x, codec)
    features = features_from_arrays(arrays, codec)
    return HeldUpload(device, 0, "train", np.arange(n, dtype=np.int64) + 1000 * seed, features,
                      rng.standard_normal((n, k)).astype(np.float16), rng.integers(0, k, n)), arrays


@pytest.mark.parametrize("codec", ["int8", "fp16", "fp32"])
def test_rows_equal_the_codecs_decode_and_the_peak_is_the_dequantized_max(codec):
    upload, arrays = _held("d", 50, 1, codec)
    decoded = decode_features(arrays, codec)
    rows = np.array([3, 0, 49, 7])
    # fp32 uploads are held as server.feature_storage (float16 by default): equal to fp16 precision
    np.testing.assert_allclose(upload.features.rows(rows), decoded[rows], rtol=1e-3 if codec == "fp32" else 0,
                               atol=1e-6)
    peak = upload.validate(10, (4, 3, 3))
    assert peak == pytest.approx(float(np.abs(decoded).max()), rel=1e-3)
    if codec == "int8":  # one byte per value, held as sent
        assert upload.features.data.dtype == np.uint8 and upload.features.data is arrays["features_q"]


def test_non_finite_scales_or_values_are_refused_without_dequantizing():
    upload, _ = _held("d", 20, 2)
    upload.features.scale[1] = np.nan
    with pytest.raises(MessageError, match="NaN or Inf"):
        upload.validate()
    upload, _ = _held("d", 20, 2)
    upload.features.low[0] = np.inf
    with pytest.raises(MessageError, match="NaN or Inf"):
        upload.validate()
    upload, _ = _held("d", 20, 2, codec="fp16")
    upload.features.data[5, 0, 0, 0] = np.nan
    with pytest.raises(MessageError, match="NaN or Inf"):
        upload.validate()
    huge, _ = _held("d", 20, 2)  # finite but enormous: its bound is computed in float64 (the magnitude check's job)
    huge.features.scale[:] = np.float32(1e30)
    assert np.isfinite(huge.validate()) and huge.validate() > 1e32


def test_a_batch_from_the_segments_equals_indexing_their_concatenation(tmp_path):
    uploads = [_held(f"dev{i}", n, i)[0] for i, n in enumerate([30, 1, 17])]
    store = FeatureStore()
    for u in uploads:
        store.put(u)
    devices, offsets = store.layout()
    assert devices == ["dev0", "dev1", "dev2"] and offsets.tolist() == [0, 30, 31, 48] and len(store) == 48
    all_features = np.concatenate([u.features.rows(slice(None)) for u in uploads])
    all_logits = np.concatenate([u.logits.astype(np.float32) for u in uploads])
    all_labels = np.concatenate([u.labels for u in uploads])
    index = np.random.default_rng(0).permutation(48)[:20]
    features, logits, labels = store.batch(index, devices, offsets)
    np.testing.assert_array_equal(features, all_features[index])
    np.testing.assert_array_equal(logits, all_logits[index])
    np.testing.assert_array_equal(labels, all_labels[index])


def test_segments_beyond_the_budget_are_memory_mapped_and_read_the_same(tmp_path):
    a, b = _held("devA", 40, 1)[0], _held("devB", 40, 2)[0]
    store = FeatureStore(memory_bytes=a.nbytes + 10, spill_dir=tmp_path / "features")
    assert store.put(a) is a                       # within the budget: held by reference
    held_b = store.put(b)                          # past it: the values move to a file
    assert isinstance(held_b.features.data, np.memmap) and len(list((tmp_path / "features").iterdir())) == 1
    np.testing.assert_array_equal(held_b.features.data, b.features.data)
    devices, offsets = store.layout()
    features, _, _ = store.batch(np.array([0, 79, 45]), devices, offsets)
    np.testing.assert_array_equal(features[1], b.features.rows(np.array([39]))[0])
    assert store.resident_bytes() == a.nbytes
    store.drop("devB")                             # a device dropped (stale): its file goes with it
    assert not list((tmp_path / "features").iterdir()) and "devB" not in store


def test_an_int8_sample_is_held_in_little_more_than_its_wire_bytes():
    upload, arrays = _held("d", 1000, 3, c=16, hw=14)
    compact = sum(a.nbytes for a in arrays.values()) + upload.logits.nbytes + 16 * 1000  # + ids and labels
    store = FeatureStore()
    store.put(upload)
    assert store.nbytes() <= 1.05 * compact   # the fp32 form would be 4x


def test_the_server_trains_on_held_uploads_and_a_torch_upload_alike(tmp_path):
    from cloud_runtime.config import ServerConfig
    from cloud_runtime.server_trainer import GKTServer
    from edge_sdk.messages import FeatureUpload
    from model_zoo import create_model
    model = create_model("resnet55_server", num_classes=10, feature_channels=4)
    server = GKTServer(model, ServerConfig(batch_size=16), 10)
    upload = _held("devA", 40, 1)[0]
    server.ingest(upload)
    x = torch.rand(24, 4, 3, 3)
    server.ingest(FeatureUpload("devB", 0, "train", np.arange(24), x, torch.randn(24, 10), torch.randint(0, 10, (24,))))
    assert server.train_store.get("devB").features.data.dtype == np.float16
    replies, stats = server.train_round(0)
    assert stats.samples == 64 and replies["devA"].sample_ids is upload.sample_ids
    assert replies["devB"].logits.shape == (24, 10) and torch.isfinite(replies["devB"].logits).all()
    result = server.evaluate([upload])
    assert result.samples == 40 and 0 <= result.accuracy <= 1


def test_bf16_precision_trains_with_fp32_weights_and_answers_fp32_soft_labels():
    from cloud_runtime.config import ServerConfig
    from cloud_runtime.server_trainer import GKTServer
    from model_zoo import create_model
    model = create_model("resnet55_server", num_classes=10, feature_channels=4)
    server = GKTServer(model, ServerConfig(batch_size=16, precision="bf16"), 10)
    upload = _held("devA", 40, 1)[0]
    server.ingest(upload)
    replies, stats = server.train_round(0)
    assert np.isfinite(stats.loss) and replies["devA"].logits.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in server.model.parameters())
    assert 0 <= server.evaluate([upload]).accuracy <= 1


def test_precision_must_be_fp32_or_bf16():
    from cloud_runtime.config import ConfigError, load_runtime_config
    with pytest.raises(ConfigError, match="precision"):
        load_runtime_config(None, ["server.precision=fp8"])


# -- what the review of the store found (each would have caught its defect) ----------------------------------


def test_a_spill_that_fails_keeps_the_upload_in_ram_and_the_previous_one_until_then(tmp_path, monkeypatch, caplog):
    import errno
    import cloud_runtime.features as F
    store = FeatureStore(memory_bytes=0, spill_dir=tmp_path / "features")
    first = store.put(_held("devA", 30, 1)[0])
    assert isinstance(first.features.data, np.memmap)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(F.np, "save", full_disk)
    second = _held("devA", 30, 2)[0]
    assert store.put(second) is second            # held in RAM past the budget, never an error for the device
    assert store.get("devA") is second and "could not be memory-mapped" in caplog.text
    assert list((tmp_path / "features").iterdir()) == []  # the first file went with the segment it held


def test_spill_files_of_an_earlier_process_are_removed_and_a_closed_run_leaves_none(tmp_path):
    from cloud_runtime.config import ServerConfig
    from cloud_runtime.server_trainer import GKTServer
    from model_zoo import create_model
    spill = tmp_path / "features"
    spill.mkdir()
    (spill / "0123456789abcdef.1.npy").write_bytes(b"left by a crash")
    server = GKTServer(create_model("resnet55_server", num_classes=10, feature_channels=4),
                       ServerConfig(feature_memory_bytes=0), 10, spill_dir=str(spill))
    assert list(spill.iterdir()) == []
    server.ingest(_held("devA", 20, 1)[0])
    assert len(list(spill.iterdir())) == 1
    server.train_store.clear()
    assert list(spill.iterdir()) == []


def test_a_constant_int8_channel_is_bounded_by_its_values_not_by_scale_one():
    x = np.zeros((20, 3, 2, 2), np.float32)
    x[:, 1] = np.random.default_rng(0).random((20, 2, 2)) * 5   # channels 0 and 2 are constant: scale 1.0
    x[:, 2] = 7.0
    upload = HeldUpload("d", 0, "train", np.arange(20, dtype=np.int64), features_from_arrays(encode_features(x, "int8"),
                        "int8"), np.zeros((20, 4), np.float16), np.zeros(20, np.int64))
    assert upload.validate(limit=100) == pytest.approx(7.0)   # not |low| + 255


def test_int8_values_past_float32_are_non_finite_whatever_the_magnitude_bound():
    upload, _ = _held("d", 10, 1)
    upload.features.low[:] = np.float32(-3e38)
    upload.features.scale[:] = np.float32(2.3e36)  # 255 * scale overflows float32 in rows()
    with pytest.raises(MessageError, match="NaN or Inf"):
        upload.validate(limit=float("inf"))


def test_fp32_uploads_are_checked_as_sent_and_kept_fp32_past_float16s_range():
    upload, _ = _held("d", 10, 1, codec="fp32")
    upload.features.data[0, 0, 0, 0] = 7e4
    assert upload.validate() == pytest.approx(7e4)        # a magnitude to judge, not an fp16 overflow to inf
    assert upload.stored("float16", upload.validate()).features.data.dtype == np.float32
    upload.features.data[0, 0, 0, 0] = 1.0
    assert upload.stored("float16", upload.validate()).features.data.dtype == np.float16
