import pytest

from cloud_runtime.config import ExperimentConfig, load_config
from edgefl_core.config import ConfigError, apply_overrides, build_dataclass


def write(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_quickstart_config_is_valid():
    cfg = load_config("configs/quickstart.yaml")
    assert cfg.run.devices >= 4 and cfg.data.dataset == "fashion_mnist"


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'edge\.lrr'.*lr"):
        load_config(write(tmp_path, "edge:\n  lrr: 0.1\n"))
    with pytest.raises(ConfigError, match="unknown config key 'serverr'"):
        load_config(write(tmp_path, "serverr: {}\n"))


@pytest.mark.parametrize("text, message", [
    ("edge:\n  lr: fast\n", r"edge\.lr: expected a number"),
    ("edge:\n  epochs: 1.5\n", r"edge\.epochs: expected an integer"),
    ("edge:\n  optimizer: rmsprop\n", r"edge\.optimizer: 'rmsprop' is not one of"),
    ("edge:\n  augment:\n    hflip: maybe\n", r"edge\.augment\.hflip: expected true/false"),
    ("run:\n  rounds: 0\n", r"run\.rounds: must be >= 1"),
    ("edge:\n  model: resnet9000\n", r"edge\.model: unknown model 'resnet9000'"),
    ("server:\n  model: nope\n", r"server\.model: unknown model"),
    ("data:\n  dataset: npz\n", r"data\.path: the npz dataset needs a path"),
    ("edge: [1, 2]\n", r"edge: expected a mapping"),
])
def test_bad_values_are_named(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        load_config(write(tmp_path, text))


def test_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(write(tmp_path, "edge: {lr: 0.1\n"))
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.yaml")


def test_overrides(tmp_path):
    cfg = load_config(write(tmp_path, "edge:\n  lr: 0.1\n"),
                      ["edge.lr=0.5", "run.rounds=7", "edge.augment.hflip=true", "data.path=/x", "data.train_subset=null"])
    assert cfg.edge.lr == 0.5 and cfg.run.rounds == 7 and cfg.edge.augment.hflip and cfg.data.path == "/x"
    assert cfg.data.train_subset is None
    with pytest.raises(ConfigError, match=r"unknown config key 'edge\.nope'"):
        load_config(None, ["edge.nope=1"])
    with pytest.raises(ConfigError, match="expected dotted.key=value"):
        apply_overrides({}, ["edge.lr"])
    with pytest.raises(ConfigError, match="is not a section"):
        apply_overrides({"edge": 3}, ["edge.lr=1"])


def test_defaults_build():
    assert isinstance(build_dataclass(ExperimentConfig, {}), ExperimentConfig)
