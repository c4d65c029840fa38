import pytest
import torch

from model_zoo import create_model, list_models, register_model
from model_zoo.resnet_gkt import GKTEdgeNet

# FedML-exact trainable parameter counts for num_classes=10, in_channels=3.
EXPECTED_PARAMS = {
    "resnet8_gkt": 10_586,
    "resnet8": 10_586,
    "resnet55_server": 590_858,
    "resnet109_server": 1_147_274,
    "resnet56": 591_322,
    "resnet110": 1_147_738,
    "resnet14_gkt": 24_602,   # ours: deeper extractors, same 16-channel seam
    "resnet20_gkt": 38_618,
}


def n_params(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_every_registered_model_has_an_expected_count():
    assert set(list_models()) == set(EXPECTED_PARAMS)


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_parameter_counts_match_fedml(name):
    kwargs = {} if name.endswith("_server") else {"in_channels": 3}
    assert n_params(create_model(name, num_classes=10, **kwargs)) == EXPECTED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(EXPECTED_PARAMS))
def test_forward_shapes_and_finite(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(3, 16, 20, 20) if name.endswith("_server") else torch.randn(3, 3, 20, 20)
    out = model(x)
    if name.endswith("_gkt"):
        logits, features = out
        assert features.shape == (3, 16, 20, 20)  # the stem output is the FedGKT feature
    else:
        logits = out
    assert logits.shape == (3, 7)
    assert torch.isfinite(logits).all()


def test_edge_features_feed_the_server_and_match_resnet56_seam():
    edge = create_model("resnet8_gkt", in_channels=1).eval()
    server = create_model("resnet55_server").eval()
    logits, features = edge(torch.randn(2, 1, 28, 28))
    assert server(features).shape == (2, 10)
    full = create_model("resnet56", in_channels=1)
    # resnet56 = stem + the server body: the body has exactly the server's parameter shapes.
    body_shapes = [p.shape for p in full.body.parameters()]
    assert body_shapes == [p.shape for p in server.parameters()]


@pytest.mark.parametrize("name", ["resnet8_gkt", "resnet14_gkt", "resnet20_gkt", "resnet8", "resnet56"])
def test_pipeline_modules_compose_to_the_logits(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1).eval()
    x = torch.randn(2, 1, 12, 12)
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    h = x
    for module in model.pipeline_modules():
        h = module(h)
    assert torch.equal(h, logits)
    chain_params = {id(p) for m in model.pipeline_modules() for p in m.parameters()}
    assert chain_params == {id(p) for p in model.parameters()}  # the chain shares, not copies, weights


def test_backward_reaches_every_parameter():
    model = create_model("resnet8_gkt", in_channels=1, zero_init_residual=False)
    logits, _ = model(torch.randn(4, 1, 12, 12))
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_knobs_width_stride_maxpool():
    wide = create_model("resnet8_gkt", width=2.0)
    _, f = wide(torch.randn(2, 3, 32, 32))
    assert f.shape == (2, 32, 32, 32)
    assert n_params(wide) > 3 * EXPECTED_PARAMS["resnet8_gkt"]
    _, f = create_model("resnet8_gkt", stem_stride=2)(torch.randn(2, 3, 32, 32))
    assert f.shape == (2, 16, 16, 16)
    _, f = create_model("resnet8_gkt", stem_kernel=5, stem_max_pool=True)(torch.randn(2, 3, 32, 32))
    assert f.shape == (2, 16, 16, 16)
    server = create_model("resnet55_server", width=2.0)  # takes the wide edge's 32-channel features
    assert server(torch.randn(2, 32, 8, 8)).shape == (2, 10)
    full = create_model("resnet56", width=0.5, stem_stride=2, stem_max_pool=True)
    assert full(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_server_rejects_wrong_feature_channels():
    with pytest.raises(ValueError, match="B x 16 x H x W"):
        create_model("resnet55_server")(torch.randn(2, 3, 8, 8))


def test_unknown_model_name_lists_known_ones():
    with pytest.raises(ValueError, match="unknown model 'resnet9000'.*resnet56"):
        create_model("resnet9000")


def test_duplicate_registration_raises():
    with pytest.raises(ValueError, match="already registered"):
        @register_model
        def resnet56(**kwargs):  # noqa: F811
            return GKTEdgeNet(**kwargs)


def test_bad_width_is_an_error():
    with pytest.raises(ValueError, match="width"):
        create_model("resnet56", width=0)
