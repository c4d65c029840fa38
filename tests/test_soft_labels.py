"""Soft labels are keyed by sample id: whatever order batches or replies come in, every logit lands on
its own image (FedML keys them by batch index while reshuffling, which pairs them with wrong images)."""
import dataclasses

import numpy as np
import pytest
import torch

from cloud_runtime.config import ServerConfig
from cloud_runtime.server_trainer import GKTServer
from edge_sdk.client import EdgeClient
from edge_sdk.config import EdgeConfig
from edgefl_core.data.datasets import ImageDataset
from edge_sdk.messages import MessageError, SoftLabels
from edge_sdk.soft_labels import SoftLabelStore
from model_zoo import create_model, seeded


def test_store_roundtrip_in_any_order():
    ids = np.array([50, 10, 30, 20, 40])
    store = SoftLabelStore(ids, 3)
    logits = torch.arange(15, dtype=torch.float32).view(5, 3)
    perm = np.array([3, 0, 4, 1, 2])
    store.update(ids[perm], logits[perm], round_=0)
    got, present = store.lookup(np.array([20, 50]))
    assert present.all()
    assert np.array_equal(got, logits[[3, 0]].numpy())
    with pytest.raises(KeyError):
        store.lookup(np.array([99]))


def test_store_partial_coverage():
    store = SoftLabelStore(np.arange(4), 2)
    store.update(np.array([2]), torch.ones(1, 2), 0)
    _, present = store.lookup(np.arange(4))
    assert present.tolist() == [False, False, True, False] and len(store) == 1


def _dataset(n=64, seed=0):
    rng = np.random.default_rng(seed)
    return ImageDataset(rng.integers(0, 255, (n, 1, 8, 8)).astype(np.uint8), rng.integers(0, 4, n),
                        rng.permutation(np.arange(1000, 1000 + n)), 4, "toy")


def test_server_soft_labels_are_its_outputs_for_each_sample_id():
    """The server's reply for id i equals the server model's output on the features of id i."""
    torch.manual_seed(0)
    ds = _dataset()
    client = EdgeClient("d0", create_model("resnet8_gkt", in_channels=1, num_classes=4), ds, None,
                        EdgeConfig(batch_size=16))
    upload = client.extract("train", 0)
    server = GKTServer(create_model("resnet55_server", num_classes=4), ServerConfig(soft_labels="eval_pass"), 4)
    server.ingest(upload)
    replies, _ = server.train_round(0)
    reply = replies["d0"]
    # ask for samples in a scrambled order and compare with a fresh forward pass on those features
    pick = np.array([5, 17, 0, 63, 31])
    rows = [list(upload.sample_ids).index(i) for i in reply.sample_ids[pick]]
    server.model.eval()
    with torch.no_grad():
        expected = server.model(upload.features[rows].contiguous(memory_format=torch.channels_last))
    assert torch.allclose(reply.logits[pick], expected, atol=1e-3)
    # and the edge store hands the same rows back by id, whatever the batch order
    client.receive(reply)
    got, present = client.soft_labels.lookup(reply.sample_ids[pick][::-1].copy())
    assert present.all() and torch.allclose(torch.from_numpy(got), reply.logits[pick].flip(0))


def test_edge_training_uses_the_soft_labels_of_the_batch_samples():
    """During training each batch's teacher rows are the ones sent for that batch's sample ids."""
    ds = _dataset(32)
    client = EdgeClient("d0", create_model("resnet8_gkt", in_channels=1, num_classes=4), ds, None,
                        EdgeConfig(batch_size=8))
    # teacher logits encode the sample id, so any mispairing is visible
    teacher = torch.zeros(32, 4)
    teacher[:, 0] = torch.from_numpy(ds.sample_ids).float()
    client.receive(SoftLabels("d0", 0, ds.sample_ids.copy(), teacher))

    batch_ids, teacher_ids = [], []
    shuffled_loader = client.train_loader

    class RecordingLoader:
        def __iter__(self):
            for batch in shuffled_loader:
                batch_ids.append(batch.sample_ids.copy())
                yield batch

    real_step = client.trainer.train_step

    def recording_step(images, labels, teacher_logits, has_teacher):
        teacher_ids.append(teacher_logits[:, 0].clone())
        return real_step(images, labels, teacher_logits / 1e4, has_teacher)

    client.train_loader = RecordingLoader()
    client.trainer.train_step = recording_step
    client.train_round(0)
    assert len(teacher_ids) == 4
    assert np.concatenate(batch_ids).tolist() != sorted(ds.sample_ids.tolist())  # really shuffled
    for ids, got in zip(batch_ids, teacher_ids):
        assert got.tolist() == ids.astype(np.float32).tolist()


def test_receive_rejects_foreign_or_bad_messages():
    ds = _dataset(8)
    client = EdgeClient("d0", create_model("resnet8_gkt", in_channels=1, num_classes=4), ds, None, EdgeConfig())
    with pytest.raises(MessageError, match="delivered to 'd0'"):
        client.receive(SoftLabels("d1", 0, ds.sample_ids.copy(), torch.zeros(8, 4)))
    with pytest.raises(MessageError, match="NaN"):
        client.receive(SoftLabels("d0", 0, ds.sample_ids.copy(), torch.full((8, 4), float("nan"))))
    with pytest.raises(KeyError):
        client.receive(SoftLabels("d0", 0, ds.sample_ids.copy() + 10_000, torch.zeros(8, 4)))


def test_server_training_does_not_depend_on_which_device_uploaded_first():
    """The server's data order came from arrival order, so two runs of one seed could differ (the quickstart
    moved by 0.8 points between runs). Same uploads, two arrival orders: the same model and soft labels."""
    uploads = []
    for i, name in enumerate(["d0", "d1", "d2"]):
        ds = _dataset(24)
        ds = dataclasses.replace(ds, sample_ids=ds.sample_ids + 1000 * i)
        with seeded(i):
            client = EdgeClient(name, create_model("resnet8_gkt", in_channels=1, num_classes=4), ds, None,
                                EdgeConfig(batch_size=8))
        uploads.append(client.extract("train", 0))
    results = []
    for order in ([0, 1, 2], [2, 0, 1]):
        with seeded(0):
            server = GKTServer(create_model("resnet55_server", num_classes=4), ServerConfig(batch_size=16), 4)
        for i in order:
            server.ingest(uploads[i])
        replies, _ = server.train_round(0)
        results.append((server.model.state_dict(), {d: r.logits for d, r in replies.items()}))
    (model_a, soft_a), (model_b, soft_b) = results
    assert all(torch.equal(model_a[k], model_b[k]) for k in model_a)
    assert all(torch.equal(soft_a[d], soft_b[d]) for d in soft_a)
