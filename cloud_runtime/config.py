"""The cloud side's schema and the whole run configuration (what ``configs/*.yaml`` hold)."""
from __future__ import annotations

import ipaddress
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal

from edge_sdk.config import EdgeConfig, FeaturePrivacy, RunRecipe, check_profile_name
from edgefl_core.codecs import FEATURE_CODECS, MODEL_CODECS
from edgefl_core.config import ConfigError, apply_overrides, build_dataclass, load_config_file, read_yaml, require
from edgefl_core.data.config import AgentDataConfig, DataConfig
from edgefl_core.transport.config import BrokerConfig
from edgefl_core.wire import MAX_INGEST_SHARDS

# the runtime's broker account in a deployment `cloud-runtime provision` wrote (cloud_runtime/broker_files.py:
# RUNTIME_USER), whose mosquitto.conf takes each user name as the client id
PROVISIONED_USER = "cloud-runtime"


def check_model_kwargs(edge: EdgeConfig, key: str) -> None:
    """Build ``edge.model`` with its ``model_kwargs`` and run one 3x32x32 image through it: a bad keyword or
    value fails here, at config load, and not on every device that receives the recipe."""
    import torch

    from model_zoo import create_model
    try:
        with torch.no_grad():
            create_model(edge.model, **edge.model_kwargs).eval()(torch.zeros(1, 3, 32, 32))
    except Exception as e:  # TypeError, ValueError, RuntimeError, OverflowError, ...: all a bad setting
        raise ConfigError(f"{key}.model_kwargs: {edge.model} with {edge.model_kwargs!r} does not work "
                          f"({type(e).__name__}: {str(e)[:200]})") from None


def check_input_size(edge: EdgeConfig, server_model: str, server_kwargs: dict, algorithm: str, num_classes: int,
                     shape: list[int]) -> None:
    """Run a training batch of two ``shape`` images through the edge model (and the server model on its
    features): images too small for the models fail here, at config load, with the smallest size that works."""
    import torch

    from model_zoo import create_model

    def works(h: int, w: int) -> str | None:
        try:
            edge_model = create_model(edge.model, num_classes=num_classes, in_channels=shape[0], **edge.model_kwargs)
            out = edge_model.train()(torch.zeros(2, shape[0], h, w))
            if algorithm == "fedgkt":
                features = out[1]
                server = create_model(server_model, num_classes=num_classes, feature_channels=features.shape[1],
                                      **server_kwargs)
                server.train()(features.detach())
        except Exception as e:  # RuntimeError / ValueError from a conv, pool or BatchNorm
            return f"{type(e).__name__}: {str(e)[:160]}"
        return None

    problem = works(shape[1], shape[2])
    if problem is None:
        return
    smallest = next((s for s in (8, 12, 16, 24, 32, 48, 64, 96, 128, 256) if works(s, s) is None), None)
    if smallest is None or smallest <= min(shape[1:]):  # not a size problem: say what fails
        raise ConfigError(f"{edge.model}" + (f" + {server_model}" if algorithm == "fedgkt" else "")
                          + f" cannot train on input_shape {shape} ({problem})")
    raise ConfigError(f"input_shape {shape}: images of {shape[1]}x{shape[2]} are too small for {edge.model}"
                      + (f" + {server_model}" if algorithm == "fedgkt" else "")
                      + (f"; the smallest square size that works is {smallest}x{smallest}" if smallest else "")
                      + f" ({problem})")


@dataclass
class ServerConfig:
    """How the cloud trains the large model on uploaded features (FedGKT's server side)."""

    model: str = "resnet55_server"
    model_kwargs: dict = field(default_factory=dict)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    epochs: int = 1
    batch_size: int = 64
    kd_beta: float = 0.0          # weight of KD to the client logits; 0 reproduces FedML's default
    temperature: float = 3.0
    plateau_factor: float = 0.5   # ReduceLROnPlateau on the round's training loss
    plateau_patience: int = 2
    # last_epoch: soft labels are the outputs of the last training epoch (no extra pass);
    # eval_pass: one more inference pass in eval mode after training.
    soft_labels: Literal["last_epoch", "eval_pass"] = "last_epoch"
    feature_storage: Literal["float32", "float16"] = "float16"  # how fp32 uploads are held (int8 and fp16 stay)
    # bytes of features held in RAM; beyond it, devices' features are memory-mapped files under
    # <state_dir>/features (cloud_runtime/features.py). null: no limit
    feature_memory_bytes: int | None = 4 << 30
    device: Literal["auto", "cpu", "cuda"] = "auto"   # auto: CUDA when available
    # fp32, or bf16 autocast for the server model's forward (weights, optimizer and loss stay fp32): for CPUs
    # with native bf16 (avx512_bf16 / AMX) and GPUs; 1.6x samples per CPU-second at 1 thread here
    # (docs/BENCHMARKS.md)
    precision: Literal["fp32", "bf16"] = "fp32"
    # torchrun launches (cloud_runtime/distributed.py): the collectives' backend (auto: NCCL on CUDA, else Gloo)
    # and timeout (a rank that does not answer within it fails the round; ranks wait between rounds without it)
    dist_backend: Literal["auto", "gloo", "nccl"] = "auto"
    dist_timeout_s: float = 1800.0

    def check(self) -> None:
        require(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        require(self.precision in ("fp32", "bf16"), "precision", f"must be fp32 or bf16, got {self.precision!r}")
        require(self.epochs >= 1, "epochs", f"must be >= 1, got {self.epochs}")
        require(self.dist_backend in ("auto", "gloo", "nccl"), "dist_backend",
                f"must be auto, gloo or nccl, got {self.dist_backend!r}")
        require(self.dist_timeout_s > 0, "dist_timeout_s", f"must be > 0 seconds, got {self.dist_timeout_s}")
        require(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
        require(self.kd_beta >= 0, "kd_beta", "must be >= 0")
        require(self.temperature > 0, "temperature", "must be > 0")
        require(0 < self.plateau_factor < 1, "plateau_factor", "must be in (0, 1)")
        require(self.feature_memory_bytes is None or (type(self.feature_memory_bytes) is int
                                                      and self.feature_memory_bytes >= 0),
                "feature_memory_bytes", f"must be null or bytes >= 0, got {self.feature_memory_bytes!r}")
        from model_zoo import is_model, list_models
        require(is_model(self.model), "model", f"unknown model {self.model!r}; known: {', '.join(list_models())}")


@dataclass
class FedGKTConfig:
    """FedGKT options beyond the two trainers."""

    # Average the devices' feature extractors (the stem) after every round, weighted by sample count
    # (async: also discounted by staleness, FedBuff-style). Off by default: FedGKT lets every device
    # keep its own extractor; averaging helps when labels are skewed across devices.
    average_extractors: bool = False
    # sync rounds: evaluate round r on one thread while devices train round r+1 (same figures: it is joined
    # before the server trains again); false evaluates before the next round opens
    overlap_evaluation: bool = True


PRIVACY_NEEDS_FEDGKT = ("feature privacy protects FedGKT's feature uploads; FedAvg uploads weights (set "
                        "privacy.clip_norm: null, or algorithm: fedgkt)")


@dataclass
class PrivacyConfig:
    """Feature privacy (docs/PRIVACY.md): devices clip each sample's features to L2 norm ``clip_norm`` and add
    Gaussian noise of σ · clip_norm per element before upload. σ is ``noise_multiplier``, or calibrated so the
    run's ``rounds`` releases of a sample stay within (``epsilon``, ``delta``) by ``dp-accounting``. The
    ε covers the features as released, not labels, edge logits or the extractor's training. ``clip_norm``
    null: off."""

    clip_norm: float | None = None
    noise_multiplier: float | None = None
    epsilon: float | None = None
    delta: float = 1e-5

    def check(self) -> None:
        require(self.clip_norm is None or 0 < self.clip_norm <= 1e6, "clip_norm", "must be in (0, 1e6] or null")
        require(0 < self.delta < 1e-2, "delta", "must be in (0, 0.01) (well below 1 / samples per device)")
        require(self.noise_multiplier is None or 0 <= self.noise_multiplier <= 1e4, "noise_multiplier",
                "must be in [0, 1e4] or null")
        require(self.epsilon is None or 0 < self.epsilon <= 1e4, "epsilon", "must be in (0, 1e4] or null")
        require(self.noise_multiplier is None or self.epsilon is None, "epsilon",
                "give noise_multiplier or epsilon, not both")
        require(self.clip_norm is not None or (self.noise_multiplier is None and self.epsilon is None),
                "clip_norm", "noise_multiplier / epsilon need clip_norm (the noise is scaled to it)")
        if self.clip_norm is not None and (self.epsilon is not None or self.noise_multiplier):
            try:  # the accountant: fail now, not at the first report
                import dp_accounting  # noqa: F401
            except ImportError:
                raise ConfigError("privacy: accounting the noise needs dp-accounting (the cloud extra: "
                                  "pip install dp-accounting)") from None

    def recipe(self, rounds: int) -> FeaturePrivacy:
        """What devices apply: σ as given, or calibrated for ``rounds`` releases per sample."""
        if self.clip_norm is None:
            return FeaturePrivacy()
        if self.epsilon is not None:
            from cloud_runtime.privacy import calibrate_noise
            return FeaturePrivacy(self.clip_norm, calibrate_noise(self.epsilon, self.delta, rounds))
        return FeaturePrivacy(self.clip_norm, self.noise_multiplier or 0.0)


@dataclass
class FedAvgConfig:
    """FedAvg rounds: devices train the whole model and the runtime aggregates weights."""

    aggregator: str = "fedavg"            # a registered aggregator: fedavg | median | trimmed_mean
    clip_multiplier: float | None = 3.0   # clip updates longer than this x the round's median update norm
    trim_fraction: float = 0.2
    model_codec: str = "fp16"              # a registered model codec (edgefl_core.codecs.MODEL_CODECS)

    def check(self) -> None:
        require(self.model_codec in MODEL_CODECS, "model_codec", f"unknown model codec {self.model_codec!r}; "
                f"known: {', '.join(MODEL_CODECS.names())}")
        require(self.clip_multiplier is None or self.clip_multiplier > 1, "clip_multiplier", "must be > 1 or null")
        require(0 <= self.trim_fraction < 0.5, "trim_fraction", "must be in [0, 0.5)")


CONSOLE_TOKEN_ENV = "EDGEFL_CONSOLE_TOKEN"
SIMULATION_CONSOLE_ADDRESS = "127.0.0.1:0"   # edgefl-sim: any free port (several simulations may run at once)


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, treat it as reachable from outside


def split_address(address: str) -> tuple[str, int]:
    """``host:port`` (``[::1]:8470`` for IPv6) -> (host, port). Raises ConfigError."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"address: expected host:port (e.g. 127.0.0.1:8470), got {address!r}")
    return host.strip("[]"), int(port)


@dataclass
class ConsoleConfig:
    """The operator's console (docs/CONSOLE.md): a live page, ``/metrics`` (Prometheus) and a JSON status API,
    read-only, served by ``cloud-runtime serve`` and ``edgefl-sim`` on their own thread."""

    enabled: bool = True
    address: str = "127.0.0.1:8470"   # host:port (port 0: any free port, printed at start). Loopback by default:
    # any other address needs a token, and TLS in front of it (a reverse proxy: docs/CONSOLE.md)
    token_file: str | None = None     # a file holding the bearer token (EDGEFL_CONSOLE_TOKEN, when set, wins)
    max_device_series: int = 100      # per-device Prometheus series; further devices in one series, device=""
    refresh_s: float = 1.0            # the views are rebuilt at most this often, and only while someone reads them
    linger_s: float = 0.0             # after the run ends, keep serving the final state this long (Ctrl-C ends it)

    def token(self) -> str | None:
        """The bearer token: ``EDGEFL_CONSOLE_TOKEN`` when set (it wins over the file), else the first line of
        ``token_file``, else None. Raises ConfigError for a file that cannot be read or holds no token."""
        if os.environ.get(CONSOLE_TOKEN_ENV):
            return os.environ[CONSOLE_TOKEN_ENV].strip()
        if self.token_file:
            try:
                lines = Path(self.token_file).read_text().strip().splitlines()
            except (OSError, UnicodeDecodeError) as e:
                raise ConfigError(f"token_file: cannot read a token from {self.token_file}: "
                                  f"{getattr(e, 'strerror', None) or e}") from None
            if not lines or not lines[0].strip():
                raise ConfigError(f"token_file: {self.token_file} is empty: its first line must be the token")
            return lines[0].strip()
        return None

    def check(self) -> None:
        host, _ = split_address(self.address)
        require(1 <= self.max_device_series <= 100_000, "max_device_series", "must be in [1, 100000]")
        require(0.1 <= self.refresh_s <= 3600, "refresh_s", "must be in [0.1, 3600]")
        require(self.linger_s >= 0, "linger_s", "must be >= 0")
        if not self.enabled:
            return
        token = self.token()
        source = f"{CONSOLE_TOKEN_ENV} (environment)" if os.environ.get(CONSOLE_TOKEN_ENV) else "token_file"
        if token is not None and not (len(token) >= 16 and token.isascii() and token.isprintable() and " " not in token):
            raise ConfigError(f"{source}: the console token must be at least 16 printable ASCII characters without "
                              "spaces (e.g. python -c 'import secrets; print(secrets.token_urlsafe(32))')")
        require(token is not None or is_loopback(host), "address",
                f"{self.address} is not a loopback address and no token is set: anyone who reaches it would see "
                f"the fleet. Set console.token_file (or {CONSOLE_TOKEN_ENV}) and put TLS in front of it "
                "(docs/CONSOLE.md), or bind 127.0.0.1")


def check_console(console: ConsoleConfig) -> None:
    """The console's check, also when the config has no ``console`` section (the token may come from the
    environment)."""
    try:
        console.check()
    except ConfigError as e:
        message = str(e)
        raise ConfigError(message if message.startswith(("console.", CONSOLE_TOKEN_ENV)) else f"console.{message}") \
            from None


@dataclass
class RunConfig:
    name: str = "run"
    seed: int = 0
    rounds: int = 5
    devices: int = 4
    eval_every: int = 1           # evaluate every N rounds (the last round always)
    threads: int | None = None    # the runtime's torch intra-op threads (None: from the cores, see thread_plan)

    def check(self) -> None:
        require(self.threads is None or (type(self.threads) is int and self.threads >= 1), "threads",
                f"must be null or >= 1, got {self.threads!r}")
        require(self.rounds >= 1, "rounds", f"must be >= 1, got {self.rounds}")
        require(self.devices >= 1, "devices", f"must be >= 1, got {self.devices}")
        require(self.eval_every >= 1, "eval_every", f"must be >= 1, got {self.eval_every}")


@dataclass
class DeploymentConfig:
    """How ``edgefl-sim`` deploys the run over MQTT (ignored by ``--transport memory``)."""

    mode: Literal["sync", "async"] = "sync"
    codec: str = "int8"                  # a registered feature codec (edgefl_core.codecs.FEATURE_CODECS)
    chunk_bytes: int = 256 * 1024
    round_deadline_s: float = 600.0
    quorum: float = 1.0
    max_staleness: int = 2
    agent_threads: int | None = None  # engine threads per edge-agent process (None: from the cores, see thread_plan)
    # each device's engine: torch | onnxruntime (the runtime's compiled graphs, no torch on the device) |
    # mixed (even devices torch, odd onnxruntime)
    agent_engine: Literal["torch", "onnxruntime", "mixed"] = "torch"
    device_profiles: list[str] = field(default_factory=list)  # per device, round-robin; empty: "host"
    timeout_s: float = 3600.0     # the whole run
    # the runtime as a torchrun launch (cloud_runtime/distributed.py): rank 0 coordinates, every rank trains
    # the server (DDP); 1: one plain process. rank_restarts: torchrun's --max-restarts (elastic restart of the
    # group from the last checkpoint when a rank dies)
    server_ranks: int = 1
    rank_restarts: int = 0
    ingest_workers: int = 0       # the runtime's ingest.workers (sharded ingest, spawned by the runtime)

    def check(self) -> None:
        require(type(self.ingest_workers) is int and 0 <= self.ingest_workers <= MAX_INGEST_SHARDS, "ingest_workers",
                f"must be an integer in [0, {MAX_INGEST_SHARDS}], got {self.ingest_workers!r}")
        require(0 < self.quorum <= 1, "quorum", "must be in (0, 1]")
        require(type(self.server_ranks) is int and self.server_ranks >= 1, "server_ranks",
                f"must be an integer >= 1, got {self.server_ranks!r}")
        require(type(self.rank_restarts) is int and self.rank_restarts >= 0, "rank_restarts",
                f"must be an integer >= 0, got {self.rank_restarts!r}")
        require(self.codec in FEATURE_CODECS, "codec", f"unknown codec {self.codec!r}; "
                f"known: {', '.join(FEATURE_CODECS.names())}")
        require(self.agent_threads is None or (type(self.agent_threads) is int and self.agent_threads >= 1),
                "agent_threads", f"must be null or >= 1, got {self.agent_threads!r}")
        for name in self.device_profiles:
            check_profile_name(name, "device_profiles")


@dataclass
class ExperimentConfig:
    algorithm: Literal["fedgkt", "fedavg"] = "fedgkt"
    fedgkt: FedGKTConfig = field(default_factory=FedGKTConfig)
    fedavg: FedAvgConfig = field(default_factory=FedAvgConfig)
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    edge: EdgeConfig = field(default_factory=EdgeConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # a simulation's console takes any free port (several simulations may run at once); it prints the address
    console: ConsoleConfig = field(default_factory=lambda: ConsoleConfig(address=SIMULATION_CONSOLE_ADDRESS))

    def check(self) -> None:
        check_console(self.console)
        require(self.algorithm == "fedgkt" or self.privacy.clip_norm is None, "privacy",
                PRIVACY_NEEDS_FEDGKT)
        check_server_ranks(self.algorithm, self.server.batch_size, self.deployment.server_ranks,
                           "deployment.server_ranks")


def check_server_ranks(algorithm: str, batch_size: int, ranks: int, key: str) -> None:
    """What ``ranks`` ranks of server training need (the simulator's ``deployment.server_ranks`` and a torchrun
    launch's WORLD_SIZE alike): a server model to train (FedGKT's; FedAvg has none) and a row of every global
    batch each (``server.batch_size`` >= ranks). Raises ConfigError naming ``key``."""
    require(ranks == 1 or algorithm == "fedgkt", key,
            f"{ranks} ranks train FedGKT's server model; {algorithm} has none: use 1 (one process)")
    require(batch_size >= ranks, key,
            f"{ranks} ranks need server.batch_size >= {ranks} (a row of every batch each), got {batch_size}")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> ExperimentConfig:
    """YAML file (or defaults) + ``--set`` overrides -> validated :class:`ExperimentConfig`."""
    data = read_yaml(path) if path is not None else {}
    apply_overrides(data, overrides)
    if isinstance(data.get("console"), dict):  # a partial console section keeps the simulation's any-free-port
        data["console"].setdefault("address", SIMULATION_CONSOLE_ADDRESS)
    return build_dataclass(ExperimentConfig, data)


@dataclass
class ValidationConfig:
    """What the runtime accepts from a device, and when it stops listening to one."""

    max_abs_feature: float = 1e4     # |feature| above this is implausible for a BN+ReLU stem (fp16 tops at 65504)
    max_abs_logit: float = 1e4
    max_update_norm: float = 1e6     # FedAvg: ||w_device - w_global|| above this is rejected outright
    quarantine_after: int = 5        # offences outstanding (each accepted upload takes one off) -> quarantine
    quarantine_s: float = 300.0      # how long a quarantined device is ignored
    max_samples_per_device: int = 1_000_000  # a registration's sample counts (FedAvg weights, decode bounds)
    max_abs_weight: float = 1e4      # extractor averaging: |weight| above this in a device's extractor is rejected

    def check(self) -> None:
        require(self.max_abs_feature > 0, "max_abs_feature", "must be > 0")
        require(self.max_abs_logit > 0, "max_abs_logit", "must be > 0")
        require(self.max_update_norm > 0, "max_update_norm", "must be > 0")
        require(self.quarantine_after >= 1, "quarantine_after", "must be >= 1")
        require(self.quarantine_s >= 0, "quarantine_s", "must be >= 0")
        require(1 <= self.max_samples_per_device <= 10**9, "max_samples_per_device", "must be in [1, 1e9]")
        require(self.max_abs_weight > 0, "max_abs_weight", "must be > 0")


@dataclass
class IngestConfig:
    """Sharded ingest (``cloud_runtime/ingest_worker.py``, docs/DEPLOYMENT.md): ``workers`` processes share the
    uplink, each the devices of its shard (:func:`edgefl_core.wire.ingest_shard`); they reassemble, checksum
    and decompress transfers and forward them to the coordinator (``cloud-runtime serve``), which judges and
    owns the rounds. 0: the coordinator ingests alone."""

    workers: int = 0
    spawn: bool = True            # serve starts the workers on this machine and restarts one that dies; false:
    # run 'cloud-ingest --shard K' yourself (other machines, a process manager)
    restart_delay_s: float = 1.0  # a spawned worker that died is started again after this long
    # a broker account per worker, "<broker.username>-ingest-<k>" with passwords[k] (provision --ingest-workers
    # writes them): brokers that take the user name as client id (provision's mosquitto.conf) would otherwise
    # let the workers and the runtime take over one another's session. Empty: the workers log in as the runtime
    passwords: list[str] = field(default_factory=list)

    def check(self) -> None:
        require(type(self.workers) is int and 0 <= self.workers <= MAX_INGEST_SHARDS, "workers",
                f"must be an integer in [0, {MAX_INGEST_SHARDS}], got {self.workers!r}")
        require(0 <= self.restart_delay_s <= 3600, "restart_delay_s", "must be in [0, 3600] seconds")
        require(not self.passwords or (len(self.passwords) == self.workers
                                       and all(isinstance(p, str) and p for p in self.passwords)), "passwords",
                f"one non-empty password per worker ({self.workers}); got {len(self.passwords)} (provision's ACL gives "
                f"each device the uplink of its shard of the worker count it wrote, so the count changes only "
                f"through provision). Run "
                f"'cloud-runtime provision --ingest-workers {self.workers}' (it creates the missing broker accounts "
                "and keeps the others), then restart mosquitto")

    def broker_for(self, broker: BrokerConfig, shard: int) -> BrokerConfig:
        """Worker ``shard``'s broker settings: the runtime's, with the worker's own account when ``passwords``
        names one."""
        if not self.passwords:
            return broker
        return replace(broker, username=f"{broker.username}-ingest-{shard}", password=self.passwords[shard])


@dataclass
class RuntimeConfig:
    """``cloud-runtime serve``: one FedGKT run over a broker."""

    run_id: str = "default"
    algorithm: Literal["fedgkt", "fedavg"] = "fedgkt"
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    fedavg: FedAvgConfig = field(default_factory=FedAvgConfig)
    fedgkt: FedGKTConfig = field(default_factory=FedGKTConfig)
    eval_data: AgentDataConfig | None = None  # FedAvg: held-out set the runtime evaluates the global model on
    edge: EdgeConfig = field(default_factory=EdgeConfig)  # how devices train: sent to them (RunRecipe)
    edge_overrides: dict = field(default_factory=dict)    # device -> partial edge settings (e.g. fewer epochs)
    codec: str = "int8"                  # the feature codec devices upload with (+ zstd)
    num_classes: int | None = None       # the run's data: classes and C x H x W images (registrations must
    input_shape: list[int] | None = None # agree); null: the first registration fixes them
    mode: Literal["sync", "async"] = "sync"
    rounds: int = 5                      # sync: rounds; async: server updates
    min_devices: int = 1                 # start once this many registered and registration_timeout_s passed
    expected_devices: int | None = None  # start as soon as this many registered
    registration_timeout_s: float = 300.0
    round_deadline_s: float = 600.0      # a round closes at its deadline if quorum is met
    quorum: float = 0.5                  # fraction of registered devices that must have uploaded by the deadline
    offline_grace_s: float = 30.0        # a device offline for less than this is still waited for (restarts)
    eval_every: int = 1
    max_staleness: int = 2               # features older than this many rounds / server updates are not used
    soft_labels_wait_s: float = 30.0     # how long a device waits for last round's soft labels
    state_dir: str = "runtime-state"     # relative to the config file's folder
    threads: int | None = None
    # one transfer as sent (compressed; what it decodes to is bounded by the device's registered sample count),
    # and what one device's unfinished transfers may hold in the runtime's memory (and, apart, its messages
    # queued unhandled, e.g. while the server trains)
    max_transfer_bytes: int = 256 << 20
    max_pending_bytes_per_device: int = 256 << 20
    max_decoded_bytes: int = 1 << 30   # what any one transfer may decompress to, whatever the device registered
    max_chunk_bytes: int = 16 << 20
    transfer_timeout_s: float = 300.0
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)  # applied by devices to uploaded features
    console: ConsoleConfig = field(default_factory=ConsoleConfig)  # the operator's page, /metrics, JSON API
    ingest: IngestConfig = field(default_factory=IngestConfig)     # sharded ingest (ingest workers)
    seed: int = 0

    def check(self) -> None:
        check_console(self.console)
        require(self.threads is None or (type(self.threads) is int and self.threads >= 1), "threads",
                f"must be null or >= 1, got {self.threads!r}")
        require(self.rounds >= 1, "rounds", "must be >= 1")
        require(self.min_devices >= 1, "min_devices", "must be >= 1")
        require(0 < self.quorum <= 1, "quorum", "must be in (0, 1]")
        require(self.round_deadline_s > 0, "round_deadline_s", "must be > 0")
        require(self.eval_every >= 1, "eval_every", "must be >= 1")
        require(self.max_staleness >= 0, "max_staleness", "must be >= 0")
        require(self.expected_devices is None or self.expected_devices >= self.min_devices, "expected_devices",
                 "must be >= min_devices")
        require(self.algorithm == "fedgkt" or self.mode == "sync", "mode", "fedavg runs in sync mode")
        require(self.algorithm == "fedgkt" or self.privacy.clip_norm is None, "privacy",
                PRIVACY_NEEDS_FEDGKT)
        require(self.codec in FEATURE_CODECS, "codec", f"unknown codec {self.codec!r}; "
                f"known: {', '.join(FEATURE_CODECS.names())}")
        for device, override in self.edge_overrides.items():
            self.recipe_for(str(device))  # every override must make a valid edge config
            shared = sorted({"model", "model_kwargs"} & set(override))
            require(not shared, f"edge_overrides.{device}", f"{', '.join(shared)} is the run's, the same on every "
                    "device (the server and aggregation depend on it); override training settings only")
        check_model_kwargs(self.edge, "edge")
        require(self.num_classes is None or 2 <= self.num_classes <= 100_000, "num_classes", "must be in [2, 100000]")
        require(self.input_shape is None or (len(self.input_shape) == 3 and 1 <= self.input_shape[0] <= 4
                                             and all(1 <= v <= 256 for v in self.input_shape[1:])),
                "input_shape", "must be [C<=4, H<=256, W<=256]")
        require(not (self.ingest.workers and not self.ingest.passwords and self.broker.username == PROVISIONED_USER),
                "ingest.passwords", f"this config logs in as provision's runtime account ({PROVISIONED_USER}), whose "
                f"broker takes the user name as client id: {self.ingest.workers} ingest workers without accounts of "
                f"their own would log in as it and take over one another's (and the runtime's) session. Run "
                f"'cloud-runtime provision --ingest-workers {self.ingest.workers}', then restart mosquitto")
        require(self.max_transfer_bytes >= 1 << 20, "max_transfer_bytes", "must be >= 1 MiB")
        require(self.max_pending_bytes_per_device >= self.max_chunk_bytes, "max_pending_bytes_per_device",
                "must be >= max_chunk_bytes")
        if self.input_shape is not None:
            check_input_size(self.edge, self.server.model, self.server.model_kwargs, self.algorithm,
                             self.num_classes or 10, self.input_shape)

    def recipe_for(self, device: str | None = None) -> RunRecipe:
        """The run recipe for ``device``: ``edge`` with that device's override applied."""
        override = (self.edge_overrides.get(device) if device else None) or {}
        if not isinstance(override, dict):
            raise ConfigError(f"edge_overrides.{device}: expected a mapping of edge settings, got {override!r}")
        edge = build_dataclass(EdgeConfig, {**asdict(self.edge), **override}, f"edge_overrides.{device}")
        return RunRecipe(self.algorithm, edge, self.codec, self.fedavg.model_codec, self.privacy.recipe(self.rounds))


# paths in a runtime.yaml are relative to the file: its state lives beside it unless it says otherwise
RUNTIME_PATH_KEYS = ("broker.ca_file", "broker.cert_file", "broker.key_file", "state_dir", "eval_data.path",
                     "eval_data.ids_file", "console.token_file")


def load_runtime_config(path: str | Path | None, overrides: list[str] | None = None) -> RuntimeConfig:
    """``runtime.yaml`` (relative paths resolved against its folder) + ``--set`` overrides -> a checked
    :class:`RuntimeConfig`. Raises ConfigError naming the key."""
    return build_dataclass(RuntimeConfig, load_config_file(path, overrides, RUNTIME_PATH_KEYS))
