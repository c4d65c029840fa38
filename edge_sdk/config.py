"""Strict YAML -> dataclass configuration, and the edge side's schema.

``build_dataclass(cls, mapping)`` checks every key and type and names the offending dotted key;
``apply_overrides(mapping, ["edge.lr=0.05"])`` implements the CLIs' ``--set`` before validation.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration is malformed; the message names the key and what was expected."""


# ---------------------------------------------------------------------------------------------
# generic strict loader


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} matches none of {_type_name(tp)}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {type(value).__name__} {value!r}")
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported field type {tp}")  # a schema bug, not a user error


def build_dataclass(cls: type, data: Any, prefix: str = ""):
    """Build ``cls`` from a mapping; unknown keys, wrong types and failed checks name the dotted key."""
    where = prefix or "config"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(f"unknown config key {key!r}; valid keys under {where}: {', '.join(fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{prefix}.{name}" if prefix else name)
              for name, value in data.items()}
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{where}: {e}") from None
    check = getattr(obj, "check", None)
    if check is not None:
        try:
            check()
        except ConfigError as e:
            raise ConfigError(f"{prefix}.{e}" if prefix else str(e)) from None
    return obj


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping, got {type(data).__name__}")
    return data


def apply_overrides(data: dict, overrides: list[str] | None) -> dict:
    """Apply ``dotted.key=value`` strings (values parsed as YAML) to a nested mapping, in place."""
    for item in overrides or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {item!r}: value is not valid YAML ({e})") from None
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def to_dict(obj: Any) -> Any:
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj


# ---------------------------------------------------------------------------------------------
# edge schema


def require(ok: bool, key: str, message: str) -> None:
    """Schema checks: raise a ConfigError naming ``key`` (``build_dataclass`` prefixes the section)."""
    if not ok:
        raise ConfigError(f"{key}: {message}")


def check_profile_name(name: str, key: str) -> None:
    """A device profile must be a shipped profile name, ``host``, or a YAML path."""
    from device_profiles import list_profiles
    known = list_profiles()
    require(name in known or Path(name).suffix in (".yaml", ".yml"), key,
            f"unknown device profile {name!r}; known: {', '.join(known)}")


@dataclass
class AugmentConfig:
    crop_padding: int = 0
    hflip: bool = False

    def check(self) -> None:
        require(self.crop_padding >= 0, "crop_padding", "must be >= 0")


@dataclass
class EdgeConfig:
    """How each device trains its extractor (FedGKT's client side)."""

    model: str = "resnet8_gkt"
    model_kwargs: dict = field(default_factory=dict)
    trainer: str = "backprop"
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 1
    batch_size: int = 64
    kd_alpha: float = 1.0       # weight of KD to the server's soft labels
    temperature: float = 3.0
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    trainer_kwargs: dict = field(default_factory=dict)

    def check(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.kd_alpha >= 0, "kd_alpha", "must be >= 0")
        require(self.temperature > 0, "temperature", "must be > 0")
        from model_zoo import is_model, list_models
        require(is_model(self.model), "model", f"unknown model {self.model!r}; known: {', '.join(list_models())}")
        from edge_sdk.trainers import check_trainer_options
        check_trainer_options(self.trainer, self.trainer_kwargs)


@dataclass
class DataConfig:
    """Which dataset, and how it is split among devices (stable sample ids throughout)."""

    dataset: Literal["fashion_mnist", "cifar10", "npz"] = "fashion_mnist"
    path: str | None = None            # default for fashion_mnist: /usr/share/datasets/fashion-mnist
    train_subset: int | None = None    # first-come stratified subset of the training split (None = all)
    test_subset: int | None = None     # None = the whole test split
    partition: Literal["homo", "hetero"] = "homo"
    alpha: float = 0.5                 # Dirichlet concentration for "hetero"
    min_samples_per_device: int = 10
    test_split: Literal["shard", "full"] = "shard"  # shard: each test image is seen by one device

    def check(self) -> None:
        require(self.alpha > 0, "alpha", f"must be > 0, got {self.alpha}")
        for name in ("train_subset", "test_subset"):
            value = getattr(self, name)
            require(value is None or value > 0, name, f"must be > 0 or null, got {value}")
        require(self.dataset != "npz" or bool(self.path), "path", "the npz dataset needs a path")


# ---------------------------------------------------------------------------------------------
# deployment schema (edge-agent)


@dataclass
class BrokerConfig:
    url: str = "mqtt://127.0.0.1:1883"   # mqtts:// for TLS
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    mqtt5: bool = True
    allow_insecure: bool = False         # plaintext/anonymous to a non-loopback broker: only if you mean it

    def check(self) -> None:
        from edge_sdk.mqtt import BrokerAddress
        try:
            address = BrokerAddress.parse(self.url)
        except ValueError as e:
            raise ConfigError(f"url: {e}") from None
        require(5 <= self.keepalive <= 3600, "keepalive", "must be in [5, 3600] seconds")
        if not self.allow_insecure and not address.is_loopback:
            # Deployments use TLS and credentials (cloud-runtime provision); plaintext is for local simulation.
            require(address.tls, "url", f"plaintext mqtt:// to a non-loopback host ({address.host}) is refused; "
                    "use mqtts:// (see cloud-runtime provision) or set broker.allow_insecure: true")
            require(bool(self.username), "username", f"a non-loopback broker ({address.host}) needs credentials; "
                    "or set broker.allow_insecure: true")


@dataclass
class UploadConfig:
    codec: Literal["fp32", "fp16", "int8"] = "int8"   # feature codec (+ zstd); see docs/CODECS.md
    model_codec: Literal["fp32", "fp16"] = "fp16"      # FedAvg weights (+ zstd)
    chunk_bytes: int = 256 * 1024
    max_bytes_per_s: int | None = None                 # cap the uplink (metered or shared links); null = no cap

    def check(self) -> None:
        require(1024 <= self.chunk_bytes <= 64 << 20, "chunk_bytes", "must be in [1 KiB, 64 MiB]")
        require(self.max_bytes_per_s is None or self.max_bytes_per_s >= 1024, "max_bytes_per_s", "must be >= 1024")


@dataclass
class AgentDataConfig:
    dataset: Literal["fashion_mnist", "cifar10", "npz"] = "fashion_mnist"
    path: str | None = None
    ids_file: str | None = None   # JSON {"train": [...], "test": [...]} of sample ids; null = whole dataset

    def check(self) -> None:
        require(self.dataset != "npz" or bool(self.path), "path", "the npz dataset needs a path")


@dataclass
class AgentConfig:
    device_id: str
    run_id: str = "default"
    algorithm: Literal["fedgkt", "fedavg"] = "fedgkt"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    data: AgentDataConfig = field(default_factory=AgentDataConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    state_dir: str = "agent-state"
    profile: str | None = None     # device profile name, reported at registration
    heartbeat_s: float = 10.0
    threads: int | None = 1        # torch intra-op threads on the device
    seed: int = 0

    def check(self) -> None:
        from edge_sdk.protocol import check_device_id
        try:
            check_device_id(self.device_id)
        except ValueError as e:
            raise ConfigError(f"device_id: {e}") from None
        require(self.heartbeat_s > 0, "heartbeat_s", "must be > 0")
        if self.profile is not None:
            check_profile_name(self.profile, "profile")


def load_agent_config(path: str | Path | None, overrides: list[str] | None = None) -> AgentConfig:
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    return build_dataclass(AgentConfig, data)
