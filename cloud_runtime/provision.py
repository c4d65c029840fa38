"""``cloud-runtime provision``: everything a secured deployment needs, generated in one directory.

    cloud-runtime provision --out deploy --devices dev0,dev1,dev2 --host broker.example.org

writes::

    deploy/ca/ca.crt ca.key           a private CA (keep ca.key offline; agents only need ca.crt)
    deploy/broker/broker.crt .key     the broker's TLS certificate (SAN: --host, localhost, 127.0.0.1)
    deploy/broker/passwd              mosquitto password file (PBKDF2-SHA512, mosquitto's $7$ format)
    deploy/broker/acl                 each device writes only its own up/status/hb, reads only its own down
                                      (and the run's control topic)
    deploy/broker/mosquitto.conf      TLS listener, no anonymous access, client id = user name, persistence
    deploy/runtime/runtime.yaml       the runtime's broker section (mqtts://, its own credentials)
    deploy/devices/<dev>/agent.yaml   one agent config per device (mqtts://, its credentials, the CA)

Secrets (keys, passwords) are written with mode 0600. Re-running with new devices keeps existing
credentials and the CA unless ``--force`` is given, so adding a device does not re-key the fleet.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import logging
import os
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


@dataclass
class Provisioned:
    out: Path
    broker_conf: Path
    ca_file: Path
    runtime_config: Path
    agent_configs: dict[str, Path]
    url: str


def _read_yaml(path: Path) -> dict:
    return yaml.safe_load(path.read_text()) or {} if path.exists() else {}


# the run facts a provisioned runtime starts with (the runtime never takes them from a device's registration)
RUN_FACTS = {"fashion_mnist": (10, [1, 28, 28]), "cifar10": (10, [3, 32, 32])}


def provision(out: str | Path, devices: list[str], *, host: str = "localhost", port: int = 8883,
              bind: str = "0.0.0.0", run_id: str | None = None, days: int = 825,
              max_message_bytes: int = 8 << 20, force: bool = False,
              broker_user: str = "mosquitto", any_run: bool = False, dataset: str = "fashion_mnist") -> Provisioned:
    """A TLS broker, credentials, an ACL and configs for ``devices``. The deployment is for one named run id
    (``run_id``, else the one provisioned before, else ``default``) and the ACL pins every device to it unless
    ``any_run``; the runtime config states the run's classes and image shape (from ``dataset``)."""
    out = Path(out)
    if dataset not in RUN_FACTS:
        raise ValueError(f"dataset {dataset!r}: one of {', '.join(RUN_FACTS)}")
    if not devices:
        raise ValueError("provision needs at least one device id")
    for device in devices:
        check_device_id(device)
        if device == RUNTIME_USER:
            raise ValueError(f"device id {device!r} is reserved for the runtime's broker account")
    if len(set(devices)) != len(devices):
        raise ValueError("device ids must be unique")
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

    scheme_url = f"mqtts://{host}:{port}"
    runtime_path = out / "runtime" / "runtime.yaml"
    accounts: dict[str, str] = {}
    existing_runtime = _read_yaml(runtime_path) if not force else {}
    run_id = run_id or existing_runtime.get("run_id") or "default"
    accounts[RUNTIME_USER] = existing_runtime.get("broker", {}).get("password") or new_password()
    agent_paths = {}
    for device in devices:
        path = out / "devices" / device / "agent.yaml"
        existing = _read_yaml(path) if not force else {}
        accounts[device] = existing.get("broker", {}).get("password") or new_password()
        agent = {**existing, "device_id": device, "run_id": run_id,
                 "broker": {"url": scheme_url, "username": device, "password": accounts[device],
                            "ca_file": str(ca_crt.resolve())},
                 "state_dir": existing.get("state_dir", str((path.parent / "state").resolve()))}
        _write_secret(path, yaml.safe_dump(agent, sort_keys=False).encode())
        agent_paths[device] = path
    num_classes, input_shape = RUN_FACTS[dataset]
    runtime = {"num_classes": num_classes, "input_shape": input_shape, **existing_runtime, "run_id": run_id,
               "broker": {"url": scheme_url, "username": RUNTIME_USER, "password": accounts[RUNTIME_USER],
                          "ca_file": str(ca_crt.resolve())}}
    _write_secret(runtime_path, yaml.safe_dump(runtime, sort_keys=False).encode())
    # Devices provisioned earlier but not named now keep their accounts: removing a device is explicit.
    for path in sorted((out / "devices").glob("*/agent.yaml")):
        device = path.parent.name
        if device not in accounts:
            accounts[device] = _read_yaml(path)["broker"]["password"]
    _write_secret(broker_dir / "passwd",
                  "".join(f"{user}:{mosquitto_password_hash(pw)}\n" for user, pw in accounts.items()).encode())
    (broker_dir / "acl").write_text(acl_text([u for u in accounts if u != RUNTIME_USER], None if any_run else run_id))
    conf = broker_dir / "mosquitto.conf"
    conf.write_text(mosquitto_conf(broker_dir, ca_crt, port, bind, max_message_bytes, broker_user))
    _hand_to_broker_user(broker_dir, broker_user)
    logger.info("provisioned %d devices in %s (broker %s)", len(devices), out, scheme_url)
    return Provisioned(out, conf, ca_crt, runtime_path, agent_paths, scheme_url)


def main(args) -> int:
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    result = provision(args.out, devices, host=args.host, port=args.port, bind=args.bind, run_id=args.run_id,
                       days=args.days, max_message_bytes=args.max_message_bytes, force=args.force,
                       broker_user=args.broker_user, any_run=args.any_run, dataset=args.dataset)
    print(f"broker:   mosquitto -c {result.broker_conf}")
    print(f"runtime:  cloud-runtime serve --config {result.runtime_config}   (add your run settings)")
    for device, path in result.agent_configs.items():
        print(f"{device}: edge-agent --config {path}")
    print(f"CA certificate for clients: {result.ca_file}; keep {result.ca_file.with_name('ca.key')} offline")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("provision", help="generate a CA, broker certificate, credentials, ACL and configs")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--devices", required=True, help="comma-separated device ids (also their broker user names)")
    p.add_argument("--host", default="localhost", help="host name agents use to reach the broker")
    p.add_argument("--port", type=int, default=8883)
    p.add_argument("--bind", default="0.0.0.0", help="address the broker listens on")
    p.add_argument("--run-id", default=None, help="the run this deployment is for; the ACL pins devices to it "
                                                  "(default: the one provisioned before, else 'default')")
    p.add_argument("--any-run", action="store_true", help="let devices publish under any run id (not recommended)")
    p.add_argument("--dataset", default="fashion_mnist", choices=sorted(RUN_FACTS),
                   help="the run's data: sets num_classes and input_shape in runtime.yaml (default: %(default)s)")
    p.add_argument("--days", type=int, default=825, help="certificate validity")
    p.add_argument("--max-message-bytes", type=int, default=8 << 20)
    p.add_argument("--force", action="store_true", help="new CA and new credentials for everyone")
    p.add_argument("--broker-user", default="mosquitto", help="the account mosquitto drops to when started as root")
