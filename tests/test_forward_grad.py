"""Forward-gradient trainers: exact directional derivatives, unbiasedness, AsyncFGD staleness, config errors."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn

from edge_sdk.client import EdgeClient
from edge_sdk.config import ConfigError, EdgeConfig, build_dataclass
from edgefl_core.data.datasets import ImageDataset
from model_zoo.losses import gkt_loss
from edge_sdk.trainers import create_trainer, list_trainers
from edge_sdk.trainers.async_fgd import split_chain
from edge_sdk.trainers.forward_grad import (
    SUPPORTED_LAYERS, module_forward, directional_derivative, forward_gradient,
)
from model_zoo import create_model

FORWARD_TRAINERS = ["fg_weight", "fg_local_guess", "async_fgd", "forward"]


def edge_cfg(trainer: str, **kwargs) -> EdgeConfig:
    data = {"trainer": trainer, "optimizer": "sgd", "lr": 0.05, "momentum": 0.0, "weight_decay": 0.0}
    data.update(kwargs)
    return build_dataclass(EdgeConfig, data, "edge")


def layer_cases() -> dict[type, tuple[nn.Module, tuple[int, ...]]]:
    return {
        nn.Conv2d: (nn.Conv2d(3, 4, 3, stride=2, padding=1), (4, 3, 8, 8)),
        nn.BatchNorm2d: (nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)), (4, 3, 5, 5)),
        nn.Linear: (nn.Linear(6, 5), (4, 6)),
        nn.ReLU: (nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU(inplace=True)), (4, 3, 5, 5)),
        nn.MaxPool2d: (nn.Sequential(nn.Conv2d(3, 4, 1), nn.MaxPool2d(3, 2, 1)), (4, 3, 6, 6)),
        nn.AvgPool2d: (nn.Sequential(nn.Conv2d(3, 4, 1), nn.AvgPool2d(2)), (4, 3, 6, 6)),
        nn.AdaptiveAvgPool2d: (nn.Sequential(nn.Conv2d(3, 4, 1), nn.AdaptiveAvgPool2d(1)), (4, 3, 5, 5)),
        nn.Flatten: (nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.Linear(2 * 9, 3)), (4, 3, 3, 3)),
        nn.Identity: (nn.Sequential(nn.Linear(6, 5), nn.Identity()), (4, 6)),
    }


def test_every_supported_layer_has_a_derivative_test():
    assert set(layer_cases()) == set(SUPPORTED_LAYERS)


@pytest.mark.parametrize("layer", list(layer_cases()), ids=lambda t: t.__name__)
def test_directional_derivative_matches_autograd(layer):
    torch.manual_seed(0)
    module, shape = layer_cases()[layer]
    module = module.double().train()
    x = torch.randn(shape, dtype=torch.float64)
    tangents = {n: torch.randn_like(p) for n, p in module.named_parameters()}
    with torch.no_grad(), fwAD.dual_level():
        y = module_forward(module, x, tangents)
        loss = (y.flatten(1) ** 2).sum() * 0.5 + y.flatten(1).sum(1).sin().sum()
        derivative = fwAD.unpack_dual(loss).tangent
    y = module(x)
    loss = (y.flatten(1) ** 2).sum() * 0.5 + y.flatten(1).sum(1).sin().sum()
    grads = torch.autograd.grad(loss, list(module.parameters()))
    expected = sum((g * tangents[n]).sum() for g, (n, _) in zip(grads, module.named_parameters()))
    assert float(derivative) == pytest.approx(float(expected), rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("model_name", ["resnet8_gkt", "resnet14_gkt"])
def test_whole_edge_model_derivative_with_gkt_loss_matches_autograd(model_name):
    torch.manual_seed(1)
    model = create_model(model_name, num_classes=10, in_channels=1, stem_stride=2).double().train()
    chain = model.pipeline_modules()
    x = torch.randn(6, 1, 28, 28, dtype=torch.float64)
    labels = torch.randint(0, 10, (6,))
    teacher = torch.randn(6, 10, dtype=torch.float64)
    has_teacher = torch.tensor([True, False, True, True, False, True])
    cfg = edge_cfg("backprop", kd_alpha=0.7, temperature=2.0)
    tangents = [{n: torch.randn_like(p) for n, p in m.named_parameters()} for m in chain]
    nbt = int(model.stem[1].num_batches_tracked) if model_name == "resnet8_gkt" else None
    loss, *_, d, _ = directional_derivative(chain, x, tangents, labels, teacher, has_teacher, cfg)

    logits, _ = model(x)
    ref, _, _ = gkt_loss(logits, labels, teacher, has_teacher, 0.7, 2.0)
    grads = torch.autograd.grad(ref, list(model.parameters()))
    by_param = {id(p): g for p, g in zip(model.parameters(), grads)}
    expected = sum((by_param[id(p)] * t[n]).sum() for m, t in zip(chain, tangents) for n, p in m.named_parameters())
    assert d == pytest.approx(float(expected), rel=1e-5, abs=1e-6)
    assert loss == pytest.approx(float(ref.detach()), rel=1e-9)
    if nbt is not None:
        assert int(model.stem[1].num_batches_tracked) == nbt + 2  # our pass and the reference pass


def test_forward_gradient_is_unbiased_on_a_quadratic():
    # f(w) = 1/2 w'Aw - b'w, so grad f = Aw - b; the mean of (grad f . v) v over many v must match it.
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 5, generator=g, dtype=torch.float64)
    a = a @ a.T + torch.eye(5, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    w = torch.randn(5, generator=g, dtype=torch.float64)

    def derivative(v):
        with fwAD.dual_level():
            wd = fwAD.make_dual(w, v["w"])
            f = 0.5 * wd @ a @ wd - b @ wd
            return float(fwAD.unpack_dual(f).tangent)

    true = a @ w - b
    estimate = forward_gradient(derivative, {"w": w}, g, tangents=20000)["w"]
    # per-coordinate std of one sample is ~|grad| * sqrt(2); averaged over 20000 -> ~1% of |grad|
    assert torch.allclose(estimate, true, atol=0.05 * float(true.norm()))
    single = forward_gradient(derivative, {"w": w}, g, tangents=1)["w"]
    assert not torch.allclose(single, true, atol=1e-3)  # one sample is noisy: the test above is not vacuous


class ThreeModuleToy(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 6), nn.Linear(6, 3)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))

    def pipeline_modules(self):
        return [nn.Sequential(self.a, nn.ReLU()), nn.Sequential(self.b, nn.ReLU()), self.c]


def _toy_batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)) for _ in range(n)]


def test_async_fgd_staleness_descends_along_the_pipeline():
    torch.manual_seed(0)
    trainer = create_trainer("async_fgd", ThreeModuleToy(), edge_cfg("async_fgd", trainer_kwargs={"modules": 3}))
    batches = _toy_batches(6)
    finished = [trainer.train_step(x, y, None, None).samples for x, y in batches]
    assert finished == [0, 0, 8, 8, 8, 8]  # the pipeline fills for K-1 = 2 steps
    finished += [r.samples for r in trainer.finish_round()]
    assert sum(finished) == 6 * 8 and all(s is None for s in trainer.slots)
    staleness = {(b, k): s for b, k, s in trainer.staleness_log}
    # Batch b reaches module k at step b+k and the loss at step b+2; module k's update is then
    # min(b, K-1-k) updates stale (fewer while the pipeline is still filling).
    for b in range(6):
        for k in range(3):
            assert staleness[(b, k)] == min(b, 2 - k), (b, k)


def test_async_fgd_with_one_module_is_fg_weight():
    cfg_async = edge_cfg("async_fgd", trainer_kwargs={"modules": 1, "seed": 3, "warmup_steps": 0})
    cfg_fg = edge_cfg("fg_weight", trainer_kwargs={"seed": 3})
    torch.manual_seed(0)
    a = ThreeModuleToy()
    b = ThreeModuleToy()
    b.load_state_dict(a.state_dict())
    ta, tb = create_trainer("async_fgd", a, cfg_async), create_trainer("fg_weight", b, cfg_fg)
    for x, y in _toy_batches(4):
        ra, rb = ta.train_step(x, y, None, None), tb.train_step(x, y, None, None)
        assert ra.loss == pytest.approx(rb.loss, rel=1e-6)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_async_fgd_parallel_stages_match_sequential():
    results = []
    for parallel in (False, True):
        torch.manual_seed(0)
        model = ThreeModuleToy()
        trainer = create_trainer("async_fgd", model, edge_cfg(
            "async_fgd", trainer_kwargs={"modules": 3, "parallel": parallel, "seed": 1}))
        losses = [trainer.train_step(x, y, None, None).loss for x, y in _toy_batches(5)]
        losses += [r.loss for r in trainer.finish_round()]
        results.append((losses, [p.detach().clone() for p in model.parameters()]))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    for pa, pb in zip(results[0][1], results[1][1]):
        assert torch.allclose(pa, pb, atol=1e-6)


def test_fg_weight_builds_no_autograd_graph_and_counts_the_batch_once_in_batchnorm():
    torch.manual_seed(0)
    model = create_model("resnet8_gkt", num_classes=10, in_channels=1, stem_stride=2)
    trainer = create_trainer("fg_weight", model, edge_cfg("fg_weight", trainer_kwargs={"tangents": 3}))
    saved = []
    before = model.stem[1].running_mean.clone()
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        trainer.train_step(torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,)), None, None)
    assert saved == []  # nothing stored for a backward pass
    assert int(model.stem[1].num_batches_tracked) == 1
    assert not torch.equal(model.stem[1].running_mean, before)


@pytest.mark.parametrize("trainer_name", FORWARD_TRAINERS)
def test_forward_trainers_lower_the_loss_on_a_learnable_toy(trainer_name):
    # A linearly separable 3-class problem: every estimator must make progress within 300 steps.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 4, generator=g) * 3
    model = ThreeModuleToy()
    kwargs = {"modules": 2} if trainer_name == "async_fgd" else {}
    trainer = create_trainer(trainer_name, model, edge_cfg(trainer_name, optimizer="adam", lr=0.01,
                                                           trainer_kwargs=kwargs))
    losses = []
    for step in range(300):
        y = torch.randint(0, 3, (32,), generator=g)
        x = centers[y] + torch.randn(32, 4, generator=g)
        r = trainer.train_step(x, y, None, None)
        if r.samples:
            losses.append(r.loss)
    assert np.mean(losses[-30:]) < 0.6 * np.mean(losses[:10])


def test_edge_client_round_accounts_every_sample_with_a_pipelined_trainer(npz_dir):
    from edgefl_core.data.datasets import load_npz
    train = load_npz(npz_dir / "train.npz")
    train = ImageDataset(train.images[:96], train.labels[:96], np.arange(96), train.num_classes, "npz")
    model = create_model("resnet8_gkt", num_classes=train.num_classes, in_channels=train.images.shape[1])
    client = EdgeClient("dev0", model, train, None, edge_cfg("async_fgd", batch_size=16,
                                                             trainer_kwargs={"modules": 4}))
    stats = client.train_round(0)
    assert stats.samples == 96


def test_misconfiguration_is_named():
    with pytest.raises(ConfigError, match="unknown trainer 'sgd_magic'"):
        edge_cfg("sgd_magic")
    with pytest.raises(ConfigError, match="edge.trainer_kwargs: unknown config key 'trainer_kwargs.tangent'"):
        edge_cfg("fg_weight", trainer_kwargs={"tangent": 4})
    with pytest.raises(ConfigError, match="takes no options"):
        edge_cfg("backprop", trainer_kwargs={"tangents": 4})
    model = create_model("resnet8_gkt", num_classes=10, in_channels=1)
    with pytest.raises(ConfigError, match="modules=9 .*larger than the model's 4 pipeline units"):
        create_trainer("async_fgd", model, edge_cfg("async_fgd", trainer_kwargs={"modules": 9}))

    class WithGelu(ThreeModuleToy):
        def __init__(self):
            super().__init__()
            self.act = nn.GELU()

    with pytest.raises(ConfigError, match="layer 'act' \\(GELU\\) is not supported in forward mode"):
        create_trainer("fg_weight", WithGelu(), edge_cfg("fg_weight"))
    with pytest.raises(ConfigError, match="has no pipeline_modules"):
        create_trainer("fg_weight", nn.Sequential(nn.Linear(2, 2)), edge_cfg("fg_weight"))


def test_split_chain_groups_contiguously():
    chain = [nn.Linear(2, 2) for _ in range(5)]
    groups = split_chain(chain, 3)
    assert [len(g) for g in groups] == [2, 1, 2]
    assert [m for g in groups for m in g] == chain


def test_registry_lists_every_method():
    assert set(FORWARD_TRAINERS + ["backprop"]) <= set(list_trainers())
