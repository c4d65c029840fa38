"""What the broker of a secured deployment needs: credentials (mosquitto's ``$7$`` PBKDF2-SHA512 password
hashes), a private CA and the broker's TLS certificate (ECDSA P-256, via ``cryptography``), the per-device
topic ACL and ``mosquitto.conf``. Written by ``cloud-runtime provision`` (:mod:`cloud_runtime.provision`);
see docs/SECURITY.md for what each protects against and mosquitto.conf(5) for the broker settings.
"""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import logging
import os
import secrets
from pathlib import Path

from cloud_runtime.config import PROVISIONED_USER
from edgefl_core.wire import ingest_shard

logger = logging.getLogger("cloud_runtime.provision")

RUNTIME_USER = PROVISIONED_USER  # the runtime's account: the config knows it (a check on ingest workers)
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


def write_secret(path: Path, data: bytes) -> None:
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


def pem_key(key) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def pem_cert(cert) -> bytes:
    from cryptography.hazmat.primitives import serialization
    return cert.public_bytes(serialization.Encoding.PEM)


# ---------------------------------------------------------------------------------------------
# broker files


def ingest_user(shard: int | str) -> str:
    """Ingest worker ``shard``'s broker account (``IngestConfig.broker_for``)."""
    return f"{RUNTIME_USER}-ingest-{shard}"


def acl_text(devices: list[str], run_id: str | None = None, ingest_workers: int = 0) -> str:
    """mosquitto ACL: the runtime may do anything under the root; each device only its own topics (with
    ``ingest_workers`` N > 0 also the uplink of its shard, ``.../up/<k>``: only that one when the run is named, as
    a topic per shard would let one credential leave any number of retained messages on the broker; ``up/+``
    for any run, whose shards differ); ingest worker k reads (and clears retained messages on) its shard of the
    uplinks, reads its verdicts, writes its forwards, presence and progress answers on device downlinks.

    One explicit block per device (no %u patterns) so an auditor reads exactly who may do what.
    """
    base = f"{TOPIC_ROOT}/{run_id or '+'}"
    lines = ["# Generated by cloud-runtime provision. A device authenticates as its device id.",
             f"user {RUNTIME_USER}", f"topic readwrite {TOPIC_ROOT}/#", ""]
    for k in range(ingest_workers):
        lines += [f"user {ingest_user(k)}",
                  f"topic readwrite {base}/dev/+/up/{k}",  # readwrite: it clears retained chunks there
                  f"topic read {base}/ingest/{k}/verdict",
                  f"topic write {base}/ingest/{k}",
                  f"topic readwrite {base}/ingest/{k}/status",  # its presence: was it taken over?
                  f"topic write {base}/dev/+/down", ""]
    for device in devices:
        shard = [] if not ingest_workers else [f"topic write {base}/dev/{device}/up/" + (
            str(ingest_shard(run_id, device, ingest_workers)) if run_id else "+")]  # its ingest worker's shard
        lines += [f"user {device}",
                  f"topic write {base}/dev/{device}/up",
                  *shard,
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


def hand_to_broker_user(broker_dir: Path, user: str) -> None:
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
    blocked = first_blocked_parent(broker_dir.resolve(), entry.pw_uid, entry.pw_gid)
    if blocked is not None:
        logger.warning("mosquitto started as root drops to user %r, who cannot enter %s (mode %o): the broker will "
                       "fail with 'Unable to open pwfile'. Provision into a directory %s can reach, or pass "
                       "--broker-user root", user, blocked, blocked.stat().st_mode & 0o777, user)


def first_blocked_parent(path: Path, uid: int, gid: int) -> Path | None:
    """The first directory on the way to ``path`` that user ``uid`` (group ``gid``) may not enter."""
    for d in [*reversed(path.parents), path]:
        st = d.stat()
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            return d
    return None
