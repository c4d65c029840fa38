import gzip
import pickle  # tests only: builds CIFAR-style fixtures; the library never unpickles
import struct

import numpy as np
import pytest
import torch

from conftest import requires_fashion_mnist
from edgefl_core.data import safe_unpickle
from edge_sdk.data.batching import ArrayLoader
from edgefl_core.data.datasets import (DatasetError, ImageDataset, load_cifar10, load_dataset, load_fashion_mnist,
                                    load_npz, read_idx)
from edgefl_core.data.partition import (PartitionError, load_partition, make_partition, partition_hetero,
                                     save_partition)
from edge_sdk.data.transforms import Augment, random_crop


def write_idx(path, array, gz=True, magic_type=0x08):
    header = bytes([0, 0, magic_type, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def make_fmnist_dir(directory, n=20):
    directory.mkdir()
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(directory / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
        write_idx(directory / f"{prefix}-labels-idx1-ubyte.gz", rng.integers(0, 10, n))
    return directory


# -- IDX / Fashion-MNIST ----------------------------------------------------------------------


def test_idx_roundtrip_gz_and_raw(tmp_path):
    a = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    assert (read_idx(write_idx(tmp_path / "a.gz", a)) == a).all()
    assert (read_idx(write_idx(tmp_path / "a", a, gz=False)) == a).all()


def test_fashion_mnist_from_a_directory(tmp_path):
    ds = load_fashion_mnist("train", make_fmnist_dir(tmp_path / "fm"))
    assert ds.images.shape == (20, 1, 28, 28) and ds.images.dtype == np.uint8
    assert (ds.sample_ids == np.arange(20)).all()


@pytest.mark.parametrize("corruption, message", [
    (lambda raw: b"\x12\x34" + raw[2:], "bad magic"),
    (lambda raw: raw[:-7], "holds"),
    (lambda raw: raw[:6], "truncated|holds"),
])
def test_corrupt_idx_is_a_clear_error(tmp_path, corruption, message):
    raw = (bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(10))
    path = tmp_path / "bad"
    path.write_bytes(corruption(raw))
    with pytest.raises(DatasetError, match=message):
        read_idx(path)


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"\x1f\x8b" + b"garbage" * 10)
    with pytest.raises(DatasetError, match="cannot read IDX"):
        read_idx(path)


def test_images_and_labels_count_mismatch(tmp_path):
    d = make_fmnist_dir(tmp_path / "fm")
    write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(19))
    with pytest.raises(DatasetError, match="20 images but 19 labels"):
        load_fashion_mnist("train", d)


def test_missing_dataset_names_path_and_install(tmp_path):
    with pytest.raises(DatasetError, match=r"not found in .*apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path)


@requires_fashion_mnist
def test_real_fashion_mnist():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert np.bincount(test.labels).tolist() == [1000] * 10


# -- CIFAR-10 -----------------------------------------------------------------------------------


def make_cifar_py(directory, n=4):
    d = directory / "cifar-10-batches-py"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"batch_label": b"x", b"labels": rng.integers(0, 10, n).tolist(),
                 b"data": rng.integers(0, 255, (n, 3072)).astype(np.uint8)}
        (d / name).write_bytes(pickle.dumps(batch, protocol=2))
    return directory


def test_cifar10_python_layout(tmp_path):
    ds = load_cifar10("train", make_cifar_py(tmp_path))
    assert ds.images.shape == (20, 3, 32, 32) and len(ds.labels) == 20
    raw = safe_unpickle.load_file(tmp_path / "cifar-10-batches-py" / "data_batch_1")
    assert (ds.images[0].reshape(-1) == raw[b"data"][0]).all()  # R, G, B planes in order


def test_cifar10_binary_layout(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    d.mkdir()
    for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        records = np.zeros((3, 3073), dtype=np.uint8)
        records[:, 0] = [1, 2, 3]
        records[:, 1:] = 7
        records.tofile(d / name)
    ds = load_cifar10("test", tmp_path)
    assert ds.labels.tolist() == [1, 2, 3] and ds.images.shape == (3, 3, 32, 32) and (ds.images == 7).all()
    (d / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DatasetError, match="not a multiple"):
        load_cifar10("test", tmp_path)


def test_cifar10_missing(tmp_path):
    with pytest.raises(DatasetError, match="no CIFAR-10 train files"):
        load_cifar10("train", tmp_path)


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_safe_unpickle_refuses_code(tmp_path, capsys):
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    (d / "data_batch_1").write_bytes(pickle.dumps({b"data": _Evil()}))
    with pytest.raises(safe_unpickle.UnsafePickleError, match="builtins.print"):
        load_cifar10("train", tmp_path)
    assert "must never run" not in capsys.readouterr().out


@pytest.mark.parametrize("protocol", range(0, 6))
def test_safe_unpickle_reads_numpy_in_every_protocol(protocol):
    obj = {"a": np.arange(6, dtype=">f4").reshape(2, 3), "b": [1, 2.5, None, True], "c": (b"x", "y")}
    got = safe_unpickle.loads(pickle.dumps(obj, protocol=protocol))
    assert (got["a"] == obj["a"]).all() and got["b"] == obj["b"] and got["c"] == obj["c"]


# -- npz ----------------------------------------------------------------------------------------


def test_npz_gray_and_color(tmp_path):
    np.savez(tmp_path / "g.npz", images=np.zeros((5, 8, 8), np.uint8), labels=np.arange(5))
    np.savez(tmp_path / "c.npz", images=np.zeros((5, 3, 8, 8), np.uint8), labels=np.arange(5))
    assert load_npz(tmp_path / "g.npz").images.shape == (5, 1, 8, 8)
    assert load_npz(tmp_path / "c.npz").num_classes == 5


@pytest.mark.parametrize("arrays, message", [
    ({"images": np.zeros((5, 8, 8), np.uint8)}, "missing array 'labels'"),
    ({"images": np.zeros((5, 8, 8), np.float32), "labels": np.zeros(5, int)}, "must be uint8"),
    ({"images": np.zeros((5, 8), np.uint8), "labels": np.zeros(5, int)}, "N x H x W"),
    ({"images": np.zeros((5, 8, 8), np.uint8), "labels": np.zeros(4, int)}, "labels must be 5"),
])
def test_bad_npz_is_a_clear_error(tmp_path, arrays, message):
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(DatasetError, match=message):
        load_npz(tmp_path / "bad.npz")


def test_corrupt_npz_file(tmp_path):
    (tmp_path / "bad.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(DatasetError, match="cannot read npz"):
        load_npz(tmp_path / "bad.npz")


def test_load_dataset_unknown_name():
    with pytest.raises(DatasetError, match="unknown dataset 'mnist2'"):
        load_dataset("mnist2", "train")


def test_rows_of_by_sample_id():
    ds = ImageDataset(np.zeros((4, 1, 2, 2), np.uint8), np.array([0, 1, 0, 1]), np.array([40, 10, 30, 20]), 2)
    assert ds.rows_of(np.array([20, 40])).tolist() == [3, 0]
    with pytest.raises(KeyError, match="unknown sample ids"):
        ds.rows_of(np.array([11]))


# -- transforms and batching --------------------------------------------------------------------


def test_random_crop_is_a_shifted_window():
    x = torch.arange(2 * 1 * 5 * 5, dtype=torch.float32).view(2, 1, 5, 5)
    out = random_crop(x, 2, np.random.default_rng(0))
    assert out.shape == x.shape
    for i in range(2):  # every output pixel is either padding (0) or an input pixel of that image
        assert set(out[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0.0}


def test_loader_carries_ids_and_is_reproducible():
    n = 50
    ds = ImageDataset(np.tile(np.arange(n, dtype=np.uint8)[:, None, None, None], (1, 1, 4, 4)),
                      np.arange(n) % 3, np.arange(1000, 1000 + n), 3)
    seen = []
    for batch in ArrayLoader(ds, 16, shuffle=True, augment=Augment(1, True), seed=3):
        assert batch.images.shape[1:] == (1, 4, 4) and batch.images.dtype == torch.float32
        assert (batch.sample_ids == ds.sample_ids[batch.rows]).all()
        assert (batch.labels.numpy() == ds.labels[batch.rows]).all()
        seen.extend(batch.sample_ids.tolist())
    assert sorted(seen) == list(range(1000, 1000 + n))
    again = [b.sample_ids.tolist() for b in ArrayLoader(ds, 16, shuffle=True, seed=3)]
    assert sum(again, []) == seen


# -- partitions ---------------------------------------------------------------------------------


def test_homo_partition_covers_everything_once():
    ids = np.arange(100, 203)
    parts = make_partition(ids, ids % 10, 4, "homo", seed=1)
    assert sorted(np.concatenate(parts).tolist()) == ids.tolist()
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert all((a == b).all() for a, b in zip(parts, make_partition(ids, ids % 10, 4, "homo", seed=1)))


def test_hetero_partition_fedml_rule():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 10, 5000)
    ids = np.arange(5000) * 7
    parts = partition_hetero(ids, labels, 8, alpha=0.5, seed=2, min_samples=10)
    assert sorted(np.concatenate(parts).tolist()) == sorted(ids.tolist())
    assert min(map(len, parts)) >= 10
    counts = np.stack([np.bincount(labels[p // 7], minlength=10) for p in parts])
    # Dirichlet(0.5) skews classes: some device lacks a class that others have plenty of
    assert (counts.max(0) > 5 * np.maximum(counts.min(0), 1)).any()
    again = partition_hetero(ids, labels, 8, alpha=0.5, seed=2, min_samples=10)
    assert all((a == b).all() for a, b in zip(parts, again))


def test_hetero_partition_errors():
    with pytest.raises(PartitionError, match="alpha"):
        partition_hetero(np.arange(10), np.zeros(10), 2, alpha=0, seed=0)
    with pytest.raises(PartitionError, match="cannot give"):
        partition_hetero(np.arange(10), np.zeros(10), 4, alpha=1, seed=0, min_samples=5)
    with pytest.raises(PartitionError, match="unknown partition"):
        make_partition(np.arange(10), np.zeros(10), 2, "pathological")


def test_partition_save_load(tmp_path):
    parts = make_partition(np.arange(30), np.arange(30) % 3, 3, "homo", seed=0)
    save_partition(tmp_path / "p.json", parts, {"seed": 0})
    loaded, meta = load_partition(tmp_path / "p.json")
    assert meta == {"seed": 0} and all((a == b).all() for a, b in zip(parts, loaded))
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(PartitionError, match="not a saved partition"):
        load_partition(tmp_path / "bad.json")
