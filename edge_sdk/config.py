"""The edge side's configuration schema: how a device trains (``EdgeConfig``) and the agent daemon's
config file (``AgentConfig``). The loader itself is :mod:`edgefl_core.config`.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from edgefl_core.codecs import FEATURE_CODECS, MODEL_CODECS
from edgefl_core.config import ConfigError, build_dataclass, load_config_file, require
from edgefl_core.data.config import AgentDataConfig
from edgefl_core.transport.config import BrokerConfig


# A device on edge.engine=onnxruntime checks a recipe's values but not its model and trainer names: those
# live in the model zoo and trainers (torch), and the compiled edge program is what it runs.
_CODE_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("edge_code_checks", default=True)


@contextlib.contextmanager
def without_code_checks():
    """Validate EdgeConfig values without importing the model zoo or trainers (torch)."""
    token = _CODE_CHECKS.set(False)
    try:
        yield
    finally:
        _CODE_CHECKS.reset(token)


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
        require(0 <= self.crop_padding <= 32, "crop_padding", f"must be in [0, 32], got {self.crop_padding}")


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
        require(0 < self.lr <= 10, "lr", f"must be in (0, 10], got {self.lr}")
        require(0 <= self.momentum < 1, "momentum", f"must be in [0, 1), got {self.momentum}")
        require(0 <= self.weight_decay <= 1, "weight_decay", f"must be in [0, 1], got {self.weight_decay}")
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.epochs <= 1000 and self.batch_size <= 65536, "epochs", "at most 1000 epochs of batches "
                "of at most 65536")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(0 <= self.kd_alpha <= 1000, "kd_alpha", f"must be in [0, 1000], got {self.kd_alpha}")
        require(0 < self.temperature <= 1000, "temperature", f"must be in (0, 1000], got {self.temperature}")
        if not _CODE_CHECKS.get():
            return
        from model_zoo import is_model, list_models
        require(is_model(self.model), "model", f"unknown model {self.model!r}; known: {', '.join(list_models())}")
        from edge_sdk.trainers import check_trainer_options
        check_trainer_options(self.trainer, self.trainer_kwargs)


# ---------------------------------------------------------------------------------------------
# what the runtime tells devices


@dataclass
class FeaturePrivacy:
    """What devices do to each sample's features before upload (``edge_sdk/privacy.py``, docs/PRIVACY.md):
    clip to L2 norm ``clip_norm`` and add N(0, (noise_multiplier · clip_norm)²) per element. ``clip_norm``
    null: off (features go up as extracted)."""

    clip_norm: float | None = None
    noise_multiplier: float = 0.0

    def check(self) -> None:
        require(self.clip_norm is None or 0 < self.clip_norm <= 1e6, "clip_norm", "must be in (0, 1e6] or null")
        require(0 <= self.noise_multiplier <= 1e4, "noise_multiplier", "must be in [0, 1e4]")
        require(self.clip_norm is not None or self.noise_multiplier == 0, "noise_multiplier",
                "needs clip_norm (noise is scaled to the clipping bound)")


@dataclass
class RunRecipe:
    """The run as the runtime decides it and tells every device (in HELLO and round announcements):
    the algorithm, how the device trains (``edge``, with any per-device override already applied), and
    the codecs. Devices validate it strictly; a device's own config never holds these settings."""

    algorithm: Literal["fedgkt", "fedavg"] = "fedgkt"
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    codec: str = "int8"          # feature codec (+ zstd); see docs/CODECS.md
    model_codec: str = "fp16"    # FedAvg weights (+ zstd)
    privacy: FeaturePrivacy = field(default_factory=FeaturePrivacy)  # applied to features before upload

    def check(self) -> None:
        require(self.codec in FEATURE_CODECS, "codec", f"unknown codec {self.codec!r}; "
                f"known: {', '.join(FEATURE_CODECS.names())}")
        require(self.model_codec in MODEL_CODECS, "model_codec", f"unknown model codec {self.model_codec!r}; "
                f"known: {', '.join(MODEL_CODECS.names())}")


def recipe_from_frame(data: dict, device: str, *, check_code: bool = True) -> RunRecipe | None:
    """The :class:`RunRecipe` in a HELLO / ROUND frame's ``data`` with ``device``'s ``edge_overrides`` entry
    applied; None when the frame carries none. ``check_code=False`` (a device running a compiled edge program:
    the program is the code) skips checking model and trainer names against this install's registries.
    Raises ConfigError naming the bad key."""
    raw = data.get("recipe")
    if not isinstance(raw, dict):
        return None
    overrides = data.get("edge_overrides") or {}
    mine = overrides.get(device) if isinstance(overrides, dict) else None
    if isinstance(mine, dict) and isinstance(raw.get("edge"), dict):
        raw = {**raw, "edge": {**raw["edge"], **mine}}
    with (contextlib.nullcontext() if check_code else without_code_checks()):
        return build_dataclass(RunRecipe, raw, "recipe")


# ---------------------------------------------------------------------------------------------
# the device's own facts (edge-agent's config file)


@dataclass
class UploadConfig:
    """The device's link: how big its chunks are and how fast it may send."""

    chunk_bytes: int = 256 * 1024
    max_bytes_per_s: int | None = None   # cap the uplink (metered or shared links); null = no cap
    window_chunks: int = 16              # chunks in flight before the runtime's first answer (then AIMD)
    max_window_chunks: int = 256         # at most this many chunks unacknowledged

    def check(self) -> None:
        require(1 <= self.window_chunks <= self.max_window_chunks, "window_chunks", "must be in [1, max_window_chunks]")
        require(self.max_window_chunks <= 65536, "max_window_chunks", "must be <= 65536")
        require(1024 <= self.chunk_bytes <= 64 << 20, "chunk_bytes", "must be in [1 KiB, 64 MiB]")
        require(self.max_bytes_per_s is None or self.max_bytes_per_s >= 1024, "max_bytes_per_s", "must be >= 1024")


@dataclass
class AgentConfig:
    """One device: identity, broker, its data, its link, its engine (``torch`` or ``onnxruntime``, and
    threads) and profile. How it trains
    (model, trainer, codecs) is the runtime's decision, received as a :class:`RunRecipe`."""

    device_id: str
    run_id: str = "default"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    data: AgentDataConfig = field(default_factory=AgentDataConfig)
    upload: UploadConfig = field(default_factory=UploadConfig)
    state_dir: str = "agent-state"  # relative to the config file's folder
    profile: str | None = None     # device profile name, reported at registration
    heartbeat_s: float = 10.0
    engine: Literal["torch", "onnxruntime"] = "torch"  # onnxruntime: the runtime's compiled graphs, no torch
    threads: int | None = 1        # intra-op threads of the device's engine
    seed: int = 0
    after_run: Literal["exit", "wait"] = "exit"  # wait: a service stays up for the runtime's next run

    def check(self) -> None:
        from edgefl_core.wire import check_device_id
        try:
            check_device_id(self.device_id)
        except ValueError as e:
            raise ConfigError(f"device_id: {e}") from None
        require(self.heartbeat_s > 0, "heartbeat_s", "must be > 0")
        if self.profile is not None:
            check_profile_name(self.profile, "profile")


# paths in an agent.yaml are relative to the file: a provisioned bundle (config, CA, data) moves as one folder
AGENT_PATH_KEYS = ("broker.ca_file", "broker.cert_file", "broker.key_file", "state_dir", "data.path",
                   "data.ids_file")


def load_agent_config(path: str | Path | None, overrides: list[str] | None = None) -> AgentConfig:
    """``agent.yaml`` (relative paths resolved against its folder) + ``--set`` overrides -> a checked
    :class:`AgentConfig`. A config file must say where the device's data is (a ``data`` section): an agent
    never trains on a default dataset it was not pointed at. Raises ConfigError naming the key."""
    data = load_config_file(path, overrides, AGENT_PATH_KEYS)
    cfg = build_dataclass(AgentConfig, data)
    if path is not None and not isinstance(data.get("data"), dict):
        raise ConfigError(f"{path}: no data section: say where this device's data is, e.g. data: {{dataset: npz, "
                          "path: data}} (see docs/DEPLOYMENT.md, 'A device's own data')")
    return cfg
