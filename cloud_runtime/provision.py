"""``cloud-runtime provision``: everything a secured deployment needs, generated in one directory.

    cloud-runtime provision --out deploy --devices dev0,dev1,dev2 --host broker.example.org

writes::

    deploy/ca/ca.crt ca.key           a private CA (keep ca.key offline; agents only need ca.crt)
    deploy/broker/broker.crt .key     the broker's TLS certificate (SAN: --host, localhost, 127.0.0.1)
    deploy/broker/passwd              mosquitto password file (PBKDF2-SHA512, mosquitto's $7$ format)
    deploy/broker/acl                 each device writes only its own up/status/hb, reads only its own down
                                      (and the run's control topic)
    deploy/broker/mosquitto.conf      TLS listener, no anonymous access, client id = user name, persistence
    deploy/runtime/runtime.yaml       every run setting, commented; its broker account; ca.crt beside it
    deploy/devices/<dev>/             a portable bundle per device (0700): agent.yaml (relative paths, its
                                      credentials), ca.crt, data/ for the device's own data

The broker listens on --bind (default: loopback when --host is loopback). Secrets (keys, passwords,
configs holding passwords) are written with mode 0600. Re-running with new devices keeps existing
credentials and the CA unless ``--force`` is given, so adding a device does not re-key the fleet.
"""
from __future__ import annotations

import ipaddress
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from cloud_runtime.broker_files import (RUNTIME_USER, acl_text, ingest_user, hand_to_broker_user, make_ca, make_server_cert,
                                        mosquitto_conf, mosquitto_password_hash, new_password, pem_cert, pem_key,
                                        write_secret)
from edge_sdk.protocol import check_device_id

logger = logging.getLogger(__name__)


@dataclass
class Provisioned:
    out: Path
    broker_conf: Path
    ca_file: Path
    runtime_config: Path
    agent_configs: dict[str, Path]
    url: str
    bind: str = "127.0.0.1"


def _read_yaml(path: Path) -> dict:
    """A config provisioned before (the operator may have edited it): a mapping, or a ValueError naming it."""
    if not path.exists():
        return {}
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: invalid YAML ({e}); fix it or move it away to provision it anew") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: not a mapping; fix it or move it away to provision it anew")
    if not isinstance(data.get("broker") or {}, dict):
        raise ValueError(f"{path}: broker is not a mapping; fix it or move it away to provision it anew")
    return data


def _password_of(data: dict) -> str | None:
    password = (data.get("broker") or {}).get("password")
    return password if isinstance(password, str) and password else None


_PROVISIONED_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def _url_host(host: str) -> str:
    """``host`` as it goes into a URL: an IPv6 address in brackets."""
    try:
        return f"[{host}]" if ipaddress.ip_address(host).version == 6 else host
    except ValueError:
        return host


def _is_loopback(host: str) -> bool:
    from edgefl_core.transport.mqtt import BrokerAddress
    return BrokerAddress(host.strip("[]"), 0, True).is_loopback


def default_bind(host: str) -> str:
    """Where the broker listens when the operator did not say: loopback for a loopback ``host`` (a broker
    for this machine only is not exposed to the network), every interface otherwise."""
    ipv6 = ":" in host
    return ("::1" if ipv6 else "127.0.0.1") if _is_loopback(host) else ("::" if ipv6 else "0.0.0.0")


# the run facts a provisioned runtime starts with (the runtime never takes them from a device's registration)
RUN_FACTS = {"fashion_mnist": (10, [1, 28, 28]), "cifar10": (10, [3, 32, 32])}


def _yaml_value(key: str, value) -> str:
    return yaml.safe_dump({key: value}, sort_keys=False, default_flow_style=False, width=100).rstrip("\n")


def render_commented(sections: list[tuple[str, str, object]], existing: dict) -> str:
    """YAML with a comment above each setting: ``sections`` is ``(key, comment, default)``; a value the
    operator set before (``existing``) wins over the default, and settings the template does not know are
    kept at the end, so re-provisioning never loses an edit (only its comments)."""
    lines = []
    for key, comment, default in sections:
        if key.startswith("#"):  # a heading
            lines += ["", key]
            continue
        lines += [f"# {line}" for line in comment.splitlines()] if comment else []
        lines.append(_yaml_value(key, existing.get(key, default)))
    extra = {k: v for k, v in existing.items() if k not in {key for key, _, _ in sections}}
    if extra:
        lines += ["", "# other settings"] + [_yaml_value(k, v) for k, v in extra.items()]
    return "\n".join(lines).lstrip("\n") + "\n"


def agent_yaml(device: str, run_id: str, url: str, password: str, existing: dict) -> str:
    """A device's ``agent.yaml``: paths relative to the bundle folder it lives in (see docs/DEPLOYMENT.md)."""
    return render_commented([
        ("# identity and broker (written by cloud-runtime provision; paths are relative to this file)", "", None),
        ("device_id", "this device's id, also its broker user name", device),
        ("run_id", "the run this device belongs to (the broker's ACL allows no other)", run_id),
        ("broker", "ca.crt: the deployment's CA, beside this file", {
            "url": url, "username": device, "password": password, "ca_file": "ca.crt"}),
        ("# the device's own data: edit to point at it (docs/DEPLOYMENT.md, 'A device's own data')", "", None),
        ("data", "dataset: npz (path: a folder with train.npz [+ test.npz]) | image_folder (path: train/<class>/*.png\n"
                 "[+ test/<class>/...]) | fashion_mnist (IDX files) | cifar10; ids_file: optional subset of sample ids\n"
                 "fingerprint: optional; pin it to refuse to start if the data changes",
         {"dataset": "npz", "path": "data", "ids_file": None}),
        ("# the device's engine and link", "", None),
        ("engine", "torch | onnxruntime: the runtime's compiled graphs, no torch on the device (docs/EDGE_RUNTIME.md)",
         "torch"),
        ("state_dir", "progress kept across restarts (model, soft labels, rounds done)", "state"),
        ("threads", "engine threads for local training (a shared machine trains faster with few)", 1),
        ("profile", "a device profile name (device-profile --help lists them under --device) reported at registration; null: host", None),
        ("after_run", "exit: the agent exits 0 when the run ends | wait: it stays up for the next run (a service)",
         "exit"),
        ("upload", "chunk size and an optional uplink cap in bytes/s for metered links",
         {"chunk_bytes": 262144, "max_bytes_per_s": None}),
    ], existing)


def runtime_yaml(run_id: str, url: str, password: str, dataset: str, devices: int, existing: dict,
                 ingest_passwords: list[str] = (), ingest_kept: dict | None = None) -> str:
    """The runtime's config: every run setting with a comment (see RuntimeConfig for all of them)."""
    num_classes, input_shape = RUN_FACTS[dataset]
    return render_commented([
        ("# the run (written by cloud-runtime provision; paths are relative to this file)", "", None),
        ("run_id", "devices are pinned to this run id by the broker's ACL", run_id),
        ("broker", "the runtime's own broker account; ca.crt is beside this file", {
            "url": url, "username": RUNTIME_USER, "password": password, "ca_file": "ca.crt"}),
        ("algorithm", "fedgkt (devices upload features, the server trains a large CNN) | fedavg", "fedgkt"),
        ("mode", "sync: rounds wait for the quorum | async: the server trains on whatever has arrived", "sync"),
        ("rounds", "sync: rounds; async: server updates", 5),
        ("num_classes", "the run's data facts; no registration can change them (npz / image_folder data of "
                        "another kind: edit both; edge-agent data check prints them)", num_classes),
        ("input_shape", "[C, H, W] of every device's images", input_shape),
        ("# when rounds start and close", "", None),
        ("expected_devices", "round 0 opens as soon as this many devices have registered ...", devices),
        ("min_devices", "... or, after registration_timeout_s, with at least this many", 1),
        ("registration_timeout_s", "seconds to wait for expected_devices before starting with min_devices", 300),
        ("round_deadline_s", "a round closes at its deadline once the quorum has uploaded", 600),
        ("quorum", "fraction of registered devices whose uploads a round needs", 1.0),
        ("offline_grace_s", "a device offline for less than this is still waited for (restarts)", 30),
        ("eval_every", "evaluate every N rounds (the last round always)", 1),
        ("# how devices and the server train (sent to every device as the run recipe)", "", None),
        ("edge", "the devices' extractor and local training", {
            "model": "resnet8_gkt", "trainer": "backprop", "epochs": 1, "batch_size": 64, "lr": 0.01}),
        ("edge_overrides", "per-device training settings, e.g. {pi-02: {epochs: 1}}", {}),
        ("codec", "feature upload codec: int8 | fp16 | fp32 (+ zstd)", "int8"),
        ("server", "the large server CNN trained on the devices' features; feature_memory_bytes: features held in "
         "RAM, the rest memory-mapped under state_dir/features; precision bf16: faster on CPUs with native bf16 "
         "and on GPUs; dist_*: when served under torchrun (docs/DEPLOYMENT.md, several ranks)", {
            "model": "resnet55_server", "epochs": 1, "batch_size": 64, "lr": 0.05,
            "feature_memory_bytes": 4 << 30, "precision": "fp32", "dist_backend": "auto", "dist_timeout_s": 1800.0}),
        ("fedgkt", "average_extractors: FedAvg of the devices' extractors every round (uploads their weights; "
         "docs/AGGREGATION.md); overlap_evaluation: evaluate a round while devices train the next", {
             "average_extractors": False, "overlap_evaluation": True}),
        ("privacy", "features clipped to clip_norm (L2 per sample) and noised on the device: set noise_multiplier "
         "or epsilon (clip_norm alone clips without noise); docs/PRIVACY.md", {
             "clip_norm": None, "noise_multiplier": None, "epsilon": None, "delta": 1e-5}),
        ("console", "the operator's page, /metrics and /api/* (docs/CONSOLE.md): loopback only unless token_file "
         "is set (then put TLS in front of it)", {
             "enabled": True, "address": "127.0.0.1:8470", "token_file": None, "max_device_series": 100}),
        ("# the runtime's machine", "", None),
        ("state_dir", "checkpoints, report.json and plots (serve --reset-state starts the run afresh)", "state"),
        ("threads", "torch threads for server training; null: every core (set it when agents share this machine)",
         None),
        ("ingest", "sharded ingest (docs/DEPLOYMENT.md): workers reassemble and decompress uploads beside the runtime; "
         "spawn: serve starts them here; passwords: their broker accounts (provision --ingest-workers)", {
             **(ingest_kept or {}), "workers": (ingest_kept or {}).get("workers", len(ingest_passwords)),
             "spawn": (ingest_kept or {}).get("spawn", True) is not False, "passwords": list(ingest_passwords)}),
    ], existing)


def provision(out: str | Path, devices: list[str], *, host: str = "localhost", port: int = 8883,
              bind: str | None = None, run_id: str | None = None, days: int = 825,
              max_message_bytes: int = 8 << 20, force: bool = False,
              broker_user: str = "mosquitto", any_run: bool = False, dataset: str = "fashion_mnist",
              ingest_workers: int | None = None) -> Provisioned:
    """A TLS broker, credentials, an ACL and configs for ``devices``. The deployment is for one named run id
    (``run_id``, else the one provisioned before, else ``default``) and the ACL pins every device to it unless
    ``any_run``; the runtime config states the run's classes and image shape (from ``dataset``).

    Each device gets a portable bundle ``devices/<id>/`` (``agent.yaml`` with relative paths, ``ca.crt``,
    ``data/`` for its own data), 0700 with its config 0600; the runtime gets ``runtime/`` likewise. The broker
    listens on ``bind`` (default: :func:`default_bind` of ``host``). ``ingest_workers``: broker accounts for that
    many ingest workers (``ingest.passwords`` in the runtime config; None: as many as provisioned before, their
    passwords kept). Raises ValueError on a bad argument."""
    out = Path(out)
    host = host.strip("[]")  # [::1] and ::1 alike
    bind = bind or default_bind(host)
    if dataset not in RUN_FACTS:
        raise ValueError(f"dataset {dataset!r}: one of {', '.join(RUN_FACTS)}")
    if not devices:
        raise ValueError("provision needs at least one device id")
    for device in devices:
        check_device_id(device)
        if not _PROVISIONED_ID.fullmatch(device):
            raise ValueError(f"device id {device!r}: provisioned ids are 1-128 of A-Z a-z 0-9 _ . - starting with a "
                             "letter or digit (they name folders, broker accounts and ACL lines)")
        if device == RUNTIME_USER or device.startswith(ingest_user("")):
            raise ValueError(f"device id {device!r} is reserved for the runtime's (and its ingest workers') broker "
                             "accounts")
    if len(set(devices)) != len(devices):
        raise ValueError("device ids must be unique")
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port}: must be in [1, 65535]")
    try:
        ipaddress.ip_address(bind)
    except ValueError:
        raise ValueError(f"bind {bind!r}: an IP address to listen on (0.0.0.0 for every interface)") from None
    if days < 1:
        raise ValueError(f"days {days}: must be >= 1")
    if ingest_workers is not None and not 0 <= ingest_workers <= 1024:
        raise ValueError(f"ingest_workers {ingest_workers}: must be in [0, 1024]")
    ca_dir, broker_dir = out / "ca", out / "broker"
    ca_crt, ca_key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if force or not ca_crt.exists():
        ca_key, ca_cert = make_ca(f"edgefl CA ({out.resolve().name})", days)
        write_secret(ca_key_path, pem_key(ca_key))
        ca_crt.write_bytes(pem_cert(ca_cert))
        force = True  # a new CA invalidates every certificate and is a fresh deployment
    else:
        ca_key = load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    broker_dir.mkdir(parents=True, exist_ok=True)
    (broker_dir / "data").mkdir(exist_ok=True)
    key, cert = make_server_cert(ca_key, ca_cert, [host, "localhost", "127.0.0.1"], days)
    write_secret(broker_dir / "broker.key", pem_key(key))
    (broker_dir / "broker.crt").write_bytes(pem_cert(cert))

    scheme_url = f"mqtts://{_url_host(host)}:{port}"
    runtime_path = out / "runtime" / "runtime.yaml"
    accounts: dict[str, str] = {}
    existing_runtime = _read_yaml(runtime_path) if not force else {}
    run_id = run_id or existing_runtime.get("run_id") or "default"
    accounts[RUNTIME_USER] = _password_of(existing_runtime) or new_password()
    old_ingest = existing_runtime.pop("ingest", None)
    old_ingest = old_ingest if isinstance(old_ingest, dict) else {}
    kept = [p for p in old_ingest.get("passwords") or [] if isinstance(p, str) and p]
    if ingest_workers is None:  # as before: the count as the operator left it (set by hand, too)
        old_workers = old_ingest.get("workers")
        ingest_count = old_workers if type(old_workers) is int and 0 <= old_workers <= 1024 else len(kept)
    else:
        ingest_count = ingest_workers
    # one account per worker, the passwords kept: a count set by hand gets the accounts it lacks (without them its
    # workers would log in as the runtime, and a broker that takes the user name as client id would let them
    # take over one another's session)
    ingest_passwords = [kept[k] if k < len(kept) else new_password() for k in range(ingest_count)]
    for k, password in enumerate(ingest_passwords):
        accounts[ingest_user(k)] = password
    agent_paths = {}
    before = {p.parent.name for p in (out / "devices").glob("*/agent.yaml")}
    if existing_runtime.get("expected_devices") == len(before):  # provision's own count: follows the fleet
        existing_runtime.pop("expected_devices")
    for device in devices:
        bundle = out / "devices" / device
        path = bundle / "agent.yaml"
        existing = _read_yaml(path) if not force else {}
        accounts[device] = _password_of(existing) or new_password()
        existing.pop("broker", None)  # the deployment's: url, credentials and CA are provision's to write
        existing.pop("run_id", None)
        bundle.mkdir(parents=True, exist_ok=True)
        bundle.chmod(0o700)  # the bundle holds the device's password
        (bundle / "data").mkdir(exist_ok=True)
        (bundle / "ca.crt").write_bytes(ca_crt.read_bytes())
        write_secret(path, agent_yaml(device, run_id, scheme_url, accounts[device], existing).encode())
        agent_paths[device] = path
    existing_runtime.pop("broker", None)
    existing_runtime.pop("run_id", None)
    runtime_path.parent.mkdir(parents=True, exist_ok=True)
    runtime_path.parent.chmod(0o700)
    (runtime_path.parent / "ca.crt").write_bytes(ca_crt.read_bytes())
    n_devices = len(set(devices) | {p.parent.name for p in (out / "devices").glob("*/agent.yaml")})
    write_secret(runtime_path, runtime_yaml(run_id, scheme_url, accounts[RUNTIME_USER], dataset, n_devices,
                                             existing_runtime, ingest_passwords,
                                             {**old_ingest, "workers": ingest_count}).encode())
    # Devices provisioned earlier but not named now keep their accounts: removing a device is explicit.
    for path in sorted((out / "devices").glob("*/agent.yaml")):
        device = path.parent.name
        if device not in accounts:
            password = _password_of(_read_yaml(path))
            if password is None:
                raise ValueError(f"{path}: no broker.password; name {device} in --devices to give it a new one")
            accounts[device] = password
    write_secret(broker_dir / "passwd",
                  "".join(f"{user}:{mosquitto_password_hash(pw)}\n" for user, pw in accounts.items()).encode())
    workers = {ingest_user(k) for k in range(len(ingest_passwords))}   # accounts, as many as passwords
    (broker_dir / "acl").write_text(acl_text([u for u in accounts if u != RUNTIME_USER and u not in workers],
                                             None if any_run else run_id, ingest_count))
    conf = broker_dir / "mosquitto.conf"
    conf.write_text(mosquitto_conf(broker_dir, ca_crt, port, bind, max_message_bytes, broker_user))
    hand_to_broker_user(broker_dir, broker_user)
    logger.info("provisioned %d devices in %s (broker %s, listening on %s:%d)", len(devices), out, scheme_url,
                bind, port)
    return Provisioned(out, conf, ca_crt, runtime_path, agent_paths, scheme_url, bind)


def main(args) -> int:
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    result = provision(args.out, devices, host=args.host, port=args.port, bind=args.bind, run_id=args.run_id,
                       days=args.days, max_message_bytes=args.max_message_bytes, force=args.force,
                       broker_user=args.broker_user, any_run=args.any_run, dataset=args.dataset,
                       ingest_workers=args.ingest_workers)
    print(f"broker:   mosquitto -c {result.broker_conf}   (listens on {result.bind}:{args.port})")
    print(f"runtime:  cloud-runtime serve --config {result.runtime_config}   (run settings: edit that file)")
    for device, path in result.agent_configs.items():
        print(f"{device}: copy {path.parent}/ to the device, put its data in data/, then "
              f"edge-agent --config {path.parent.name}/agent.yaml")
    print(f"keep {result.ca_file.with_name('ca.key')} offline: it signs the broker's certificate")
    return 0


def _defaults_shown():
    import argparse

    class DefaultsShown(argparse.ArgumentDefaultsHelpFormatter):
        """Shows a default only where there is one to show (not for flags or options that are required)."""
        def _get_help_string(self, action):
            if action.default in (None, False) or action.required or "default:" in (action.help or ""):
                return action.help
            return super()._get_help_string(action)
    return DefaultsShown


def add_parser(sub) -> None:
    p = sub.add_parser("provision", help="generate a CA, broker certificate, credentials, ACL and configs",
                       formatter_class=_defaults_shown(),
                       description="Writes OUT/ca, OUT/broker (mosquitto.conf, passwd, acl, TLS), OUT/runtime "
                                   "(runtime.yaml + ca.crt) and one portable bundle per device, OUT/devices/<id>/ "
                                   "(agent.yaml + ca.crt + data/). Re-running adds devices and keeps credentials.")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--devices", required=True, help="comma-separated device ids (also their broker user names)")
    p.add_argument("--host", default="localhost", help="host name agents use to reach the broker")
    p.add_argument("--port", type=int, default=8883, help="the broker's TLS port")
    p.add_argument("--bind", default=None, help="address the broker listens on (default: 127.0.0.1 when --host is "
                                                "loopback, else 0.0.0.0)")
    p.add_argument("--run-id", default=None, help="the run this deployment is for; the ACL pins devices to it "
                                                  "(default: the one provisioned before, else 'default')")
    p.add_argument("--any-run", action="store_true", help="let devices publish under any run id (not recommended)")
    p.add_argument("--dataset", default="fashion_mnist", choices=sorted(RUN_FACTS),
                   help="the run's data: sets num_classes and input_shape in runtime.yaml")
    p.add_argument("--days", type=int, default=825, help="certificate validity in days")
    p.add_argument("--max-message-bytes", type=int, default=8 << 20, help="the broker's max_packet_size")
    p.add_argument("--force", action="store_true", help="new CA and new credentials for everyone")
    p.add_argument("--ingest-workers", type=int, default=None,
                   help="broker accounts (and runtime.yaml's ingest.workers) for this many ingest workers "
                        "(default: as many as provisioned before, none the first time)")
    p.add_argument("--broker-user", default="mosquitto", help="the account mosquitto drops to when started as root")
