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

import base64
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import re
import secrets
from dataclasses import dataclass
from pathlib import Path

import yaml

from edge_sdk.protocol import check_device_id

logger = logging.getLogger(__name__)

RUNTIME_USER = "cloud-runtime"
TOPIC_ROOT = "edgefl/v1"


# ---------------------------------------------------------------------------------------------
# credentials


def mosquitto_password_hash(password: str, salt: bytes | None = None, iterations: int = 101) -> str:
    """The ``$7$`` PBKDF2-SHA512 hash mosquitto 2.x reads from a password file (mosquitto_passwd's format)."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def new_password() -> str:
    return secrets.token_urlsafe(24)


# ---------------------------------------------------------------------------------------------
# certificates


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def make_ca(common_name: str, days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return key, cert


def make_server_cert(ca_key, ca_cert, hosts: list[str], days: int):
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys(hosts):  # ordered, unique
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName(names), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return key, cert


def _pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return cert.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------------------------------------
# broker files


def acl_text(devices: list[str], run_id: str | None = None) -> str:
    """mosquitto ACL: the runtime may do anything under the root; each device only its own topics.

    One explicit block per device (no %u patterns) so an auditor reads exactly who may do what.
    """
    base = f"{TOPIC_ROOT}/{run_id or '+'}"
    lines = ["# Generated by cloud-runtime provision. A device authenticates as its device id.",
             f"user {RUNTIME_USER}", f"topic readwrite {TOPIC_ROOT}/#", ""]
    for device in devices:
        lines += [f"user {device}",
                  f"topic write {base}/dev/{device}/up",
                  f"topic write {base}/dev/{device}/status",
                  f"topic write {base}/dev/{device}/hb",
                  f"topic read {base}/dev/{device}/down",
                  f"topic read {base}/control", ""]
    return "\n".join(lines)


def mosquitto_conf(broker_dir: Path, ca_file: Path, port: int, bind: str, max_message_bytes: int,
                   broker_user: str) -> str:
    d = broker_dir.resolve()
    return "\n".join([
        "# Generated by cloud-runtime provision: TLS + per-device credentials + topic ACLs.",
        f"user {broker_user}",
        "per_listener_settings false",
        "allow_anonymous false",
        f"password_file {d / 'passwd'}",
        f"acl_file {d / 'acl'}",
        "",
        f"listener {port} {bind}",
        f"cafile {ca_file.resolve()}",
        f"certfile {d / 'broker.crt'}",
        f"keyfile {d / 'broker.key'}",
        "tls_version tlsv1.2",
        "require_certificate false",
        "# a device cannot take over another device's session by reusing its client id",
        "use_username_as_clientid true",
        "",
        "persistence true",
        f"persistence_location {d / 'data'}/",
        "autosave_interval 30",
        "# queues sized for bursts of upload chunks (a drop costs a re-send, never data: see docs/PROTOCOL.md)",
        "max_queued_messages 1000000",
        "max_inflight_messages 100",
        "# small control frames and acknowledgements are not held back by Nagle's algorithm",
        "set_tcp_nodelay true",
        f"max_packet_size {max_message_bytes}",
        "max_keepalive 300",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_dest stderr",
        ""])


# ---------------------------------------------------------------------------------------------
# provisioning


def _hand_to_broker_user(broker_dir: Path, user: str) -> None:
    """mosquitto started as root drops to ``user``: its secrets and data dir must be that user's (0600)."""
    if os.geteuid() != 0:
        return  # a non-root broker runs as whoever provisioned, who owns the files already
    import pwd
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        logger.warning("broker user %r does not exist: chown %s/{passwd,broker.key,data} to the broker's user",
                       user, broker_dir)
        return
    for path in (broker_dir / "passwd", broker_dir / "broker.key", broker_dir / "acl", broker_dir / "data"):
        os.chown(path, entry.pw_uid, entry.pw_gid)
    blocked = _first_blocked_parent(broker_dir.resolve(), entry.pw_uid, entry.pw_gid)
    if blocked is not None:
        logger.warning("mosquitto started as root drops to user %r, who cannot enter %s (mode %o): the broker will "
                       "fail with 'Unable to open pwfile'. Provision into a directory %s can reach, or pass "
                       "--broker-user root", user, blocked, blocked.stat().st_mode & 0o777, user)


def _first_blocked_parent(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory on the way to ``path`` that user ``uid`` (group ``gid``) may not enter."""
    for d in [*reversed(path.parents), path]:
        st = d.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return d
    return None


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
        ("profile", "a device profile name (device-profile --list) reported at registration; null: host", None),
        ("after_run", "exit: the agent exits 0 when the run ends | wait: it stays up for the next run (a service)",
         "exit"),
        ("upload", "chunk size and an optional uplink cap in bytes/s for metered links",
         {"chunk_bytes": 262144, "max_bytes_per_s": None}),
    ], existing)


def runtime_yaml(run_id: str, url: str, password: str, dataset: str, devices: int, existing: dict) -> str:
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
        ("num_classes", "the run's data facts; no registration can change them", num_classes),
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
        ("server", "the large server CNN trained on the devices' features", {
            "model": "resnet55_server", "epochs": 1, "batch_size": 64, "lr": 0.05}),
        ("# the runtime's machine", "", None),
        ("state_dir", "checkpoints, report.json and plots (serve --reset-state starts the run afresh)", "state"),
        ("threads", "torch threads for server training; null: torch's default", None),
    ], existing)


def provision(out: str | Path, devices: list[str], *, host: str = "localhost", port: int = 8883,
              bind: str | None = None, run_id: str | None = None, days: int = 825,
              max_message_bytes: int = 8 << 20, force: bool = False,
              broker_user: str = "mosquitto", any_run: bool = False, dataset: str = "fashion_mnist") -> Provisioned:
    """A TLS broker, credentials, an ACL and configs for ``devices``. The deployment is for one named run id
    (``run_id``, else the one provisioned before, else ``default``) and the ACL pins every device to it unless
    ``any_run``; the runtime config states the run's classes and image shape (from ``dataset``).

    Each device gets a portable bundle ``devices/<id>/`` (``agent.yaml`` with relative paths, ``ca.crt``,
    ``data/`` for its own data), 0700 with its config 0600; the runtime gets ``runtime/`` likewise. The broker
    listens on ``bind`` (default: :func:`default_bind` of ``host``). Raises ValueError on a bad argument."""
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
        if device == RUNTIME_USER:
            raise ValueError(f"device id {device!r} is reserved for the runtime's broker account")
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
    ca_dir, broker_dir = out / "ca", out / "broker"
    ca_crt, ca_key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import load_pem_private_key

    if force or not ca_crt.exists():
        ca_key, ca_cert = make_ca(f"edgefl CA ({out.resolve().name})", days)
        _write_secret(ca_key_path, _pem_key(ca_key))
        ca_crt.write_bytes(_pem_cert(ca_cert))
        force = True  # a new CA invalidates every certificate and is a fresh deployment
    else:
        ca_key = load_pem_private_key(ca_key_path.read_bytes(), password=None)
        ca_cert = x509.load_pem_x509_certificate(ca_crt.read_bytes())
    broker_dir.mkdir(parents=True, exist_ok=True)
    (broker_dir / "data").mkdir(exist_ok=True)
    key, cert = make_server_cert(ca_key, ca_cert, [host, "localhost", "127.0.0.1"], days)
    _write_secret(broker_dir / "broker.key", _pem_key(key))
    (broker_dir / "broker.crt").write_bytes(_pem_cert(cert))

    scheme_url = f"mqtts://{_url_host(host)}:{port}"
    runtime_path = out / "runtime" / "runtime.yaml"
    accounts: dict[str, str] = {}
    existing_runtime = _read_yaml(runtime_path) if not force else {}
    run_id = run_id or existing_runtime.get("run_id") or "default"
    accounts[RUNTIME_USER] = _password_of(existing_runtime) or new_password()
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
        _write_secret(path, agent_yaml(device, run_id, scheme_url, accounts[device], existing).encode())
        agent_paths[device] = path
    existing_runtime.pop("broker", None)
    existing_runtime.pop("run_id", None)
    runtime_path.parent.mkdir(parents=True, exist_ok=True)
    runtime_path.parent.chmod(0o700)
    (runtime_path.parent / "ca.crt").write_bytes(ca_crt.read_bytes())
    n_devices = len(set(devices) | {p.parent.name for p in (out / "devices").glob("*/agent.yaml")})
    _write_secret(runtime_path, runtime_yaml(run_id, scheme_url, accounts[RUNTIME_USER], dataset, n_devices,
                                             existing_runtime).encode())
    # Devices provisioned earlier but not named now keep their accounts: removing a device is explicit.
    for path in sorted((out / "devices").glob("*/agent.yaml")):
        device = path.parent.name
        if device not in accounts:
            password = _password_of(_read_yaml(path))
            if password is None:
                raise ValueError(f"{path}: no broker.password; name {device} in --devices to give it a new one")
            accounts[device] = password
    _write_secret(broker_dir / "passwd",
                  "".join(f"{user}:{mosquitto_password_hash(pw)}\n" for user, pw in accounts.items()).encode())
    (broker_dir / "acl").write_text(acl_text([u for u in accounts if u != RUNTIME_USER], None if any_run else run_id))
    conf = broker_dir / "mosquitto.conf"
    conf.write_text(mosquitto_conf(broker_dir, ca_crt, port, bind, max_message_bytes, broker_user))
    _hand_to_broker_user(broker_dir, broker_user)
    logger.info("provisioned %d devices in %s (broker %s, listening on %s:%d)", len(devices), out, scheme_url,
                bind, port)
    return Provisioned(out, conf, ca_crt, runtime_path, agent_paths, scheme_url, bind)


def main(args) -> int:
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    result = provision(args.out, devices, host=args.host, port=args.port, bind=args.bind, run_id=args.run_id,
                       days=args.days, max_message_bytes=args.max_message_bytes, force=args.force,
                       broker_user=args.broker_user, any_run=args.any_run, dataset=args.dataset)
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
    p.add_argument("--broker-user", default="mosquitto", help="the account mosquitto drops to when started as root")
