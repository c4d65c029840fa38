"""A provisioned broker (cloud-runtime provision): TLS, per-device passwords and topic ACLs, on real mosquitto."""
from __future__ import annotations

import getpass
import queue
import ssl
import time

import paho.mqtt.client as mqtt
import pytest
import yaml

from cloud_runtime.provision import mosquitto_password_hash, provision
from edge_sdk.config import ConfigError, load_agent_config
from edgefl_core.wire import ingest_shard
from edgefl_core.transport.mqtt import MqttTransport
from edgefl_cli.mosquitto import EmbeddedMosquitto, free_port

pytestmark = [pytest.mark.integration, pytest.mark.system]
RUN = "secure"


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    out = tmp_path_factory.mktemp("deploy")
    port = free_port()
    # The broker runs as this test's user (pytest's tmp dirs are private to it).
    result = provision(out, ["dev0", "dev1"], host="127.0.0.1", port=port, bind="127.0.0.1", run_id=RUN,
                       broker_user=getpass.getuser(), ingest_workers=2)
    with EmbeddedMosquitto(port=port, workdir=out / "broker", config_file=result.broker_conf):
        yield result, port


def _password(result, user: str) -> str:
    path = result.runtime_config if user == "cloud-runtime" else result.agent_configs[user]
    return yaml.safe_load(path.read_text())["broker"]["password"]


class Probe:
    """A bare paho MQTT 5 client that records CONNACK, PUBACK and SUBACK reason codes and messages."""

    def __init__(self, port: int, ca_file, username: str | None = None, password: str | None = None,
                 client_id: str = "", tls: bool = True):
        self.connack: queue.Queue = queue.Queue()
        self.pubacks: dict[int, mqtt.ReasonCode] = {}
        self.subacks: dict[int, list] = {}
        self.messages: list[tuple[str, bytes]] = []
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if username is not None:
            self.client.username_pw_set(username, password)
        if tls:
            self.client.tls_set(ca_certs=str(ca_file), cert_reqs=ssl.CERT_REQUIRED)
        self.client.on_connect = lambda c, u, f, rc, p: self.connack.put(rc)
        self.client.on_publish = lambda c, u, mid, rc, p: self.pubacks.__setitem__(mid, rc)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subacks.__setitem__(mid, rcs)
        self.client.on_message = lambda c, u, m: self.messages.append((m.topic, m.payload))
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def connected(self, timeout: float = 5.0):
        """The CONNACK reason code, or None if the broker never answered."""
        try:
            return self.connack.get(timeout=timeout)
        except queue.Empty:
            return None

    def publish(self, topic: str, payload: bytes, timeout: float = 5.0, retain: bool = False):
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        deadline = time.monotonic() + timeout
        while info.mid not in self.pubacks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.pubacks.get(info.mid)

    def subscribe(self, topic: str, timeout: float = 5.0):
        _, mid = self.client.subscribe(topic, qos=1)
        deadline = time.monotonic() + timeout
        while mid not in self.subacks and time.monotonic() < deadline:
            time.sleep(0.01)
        return self.subacks.get(mid)

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


def test_mosquitto_password_hash_format():
    h = mosquitto_password_hash("secret", salt=b"0123456789ab", iterations=101)
    assert h.startswith("$7$101$MDEyMzQ1Njc4OWFi$") and len(h.split("$")[-1]) == 88


def test_anonymous_and_wrong_password_are_refused(deployment):
    result, port = deployment
    anonymous = Probe(port, result.ca_file)
    rc = anonymous.connected()
    anonymous.close()
    assert rc is not None and rc.is_failure and rc.value in (134, 135)  # bad credentials / not authorized
    wrong = Probe(port, result.ca_file, "dev0", "not-the-password")
    rc = wrong.connected()
    wrong.close()
    assert rc is not None and rc.is_failure and rc.value in (134, 135)
    right = Probe(port, result.ca_file, "dev0", _password(result, "dev0"))
    rc = right.connected()
    right.close()
    assert rc is not None and not rc.is_failure


def test_tls_is_required_and_verified(deployment, tmp_path):
    result, port = deployment
    plain = Probe(port, result.ca_file, "dev0", _password(result, "dev0"), tls=False)
    rc = plain.connected(timeout=3)
    plain.close()
    assert rc is None  # a plaintext CONNECT on the TLS listener gets no CONNACK
    other = provision(tmp_path / "other", ["devx"], host="127.0.0.1", port=1)  # a different CA
    with pytest.raises(ssl.SSLCertVerificationError):
        Probe(port, other.ca_file, "dev0", _password(result, "dev0"))


def test_a_device_cannot_publish_to_another_devices_uplink(deployment):
    result, port = deployment
    runtime = Probe(port, result.ca_file, "cloud-runtime", _password(result, "cloud-runtime"))
    dev0 = Probe(port, result.ca_file, "dev0", _password(result, "dev0"))
    try:
        assert not runtime.connected().is_failure and not dev0.connected().is_failure
        assert not runtime.subscribe(f"edgefl/v1/{RUN}/dev/+/up")[0].is_failure
        forged = dev0.publish(f"edgefl/v1/{RUN}/dev/dev1/up", b"forged upload")
        own = dev0.publish(f"edgefl/v1/{RUN}/dev/dev0/up", b"own upload")
        assert forged is not None and forged.is_failure and forged.value == 135  # PUBACK: Not authorized
        assert own is not None and not own.is_failure
        deadline = time.monotonic() + 5
        while not runtime.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert runtime.messages == [(f"edgefl/v1/{RUN}/dev/dev0/up", b"own upload")]  # the forgery never arrived
    finally:
        runtime.close()
        dev0.close()


def test_a_device_cannot_read_another_devices_downlink(deployment):
    result, port = deployment
    runtime = Probe(port, result.ca_file, "cloud-runtime", _password(result, "cloud-runtime"))
    dev0 = Probe(port, result.ca_file, "dev0", _password(result, "dev0"))
    dev1 = Probe(port, result.ca_file, "dev1", _password(result, "dev1"))
    try:
        assert all(not p.connected().is_failure for p in (runtime, dev0, dev1))
        snoop = dev0.subscribe(f"edgefl/v1/{RUN}/dev/dev1/down")
        wildcard = dev0.subscribe(f"edgefl/v1/{RUN}/dev/+/down")
        assert not dev1.subscribe(f"edgefl/v1/{RUN}/dev/dev1/down")[0].is_failure
        assert snoop is not None and wildcard is not None
        assert runtime.publish(f"edgefl/v1/{RUN}/dev/dev1/down", b"soft labels for dev1").value == 0
        deadline = time.monotonic() + 5
        while not dev1.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert dev1.messages == [(f"edgefl/v1/{RUN}/dev/dev1/down", b"soft labels for dev1")]
        assert dev0.messages == []  # subscribed twice, received nothing
    finally:
        for p in (runtime, dev0, dev1):
            p.close()


def test_a_device_cannot_take_over_another_devices_session(deployment):
    result, port = deployment
    dev1 = Probe(port, result.ca_file, "dev1", _password(result, "dev1"), client_id="dev1")
    dev0 = Probe(port, result.ca_file, "dev0", _password(result, "dev0"), client_id="dev1")  # dev1's client id
    try:
        assert not dev1.connected().is_failure and not dev0.connected().is_failure
        time.sleep(0.5)
        assert dev1.client.is_connected()  # the broker used dev0's user name as its client id: no takeover
    finally:
        dev0.close()
        dev1.close()


def test_ingest_workers_have_accounts_of_their_own_and_only_their_shard(deployment):
    """The provisioned broker takes the user name as client id: workers logging in as the runtime would take
    over its session (and one another's). Each worker has its own account, reads only its shard and verdicts,
    writes only its forwards, presence and device downlinks; no device may write where workers forward."""
    from cloud_runtime.config import load_runtime_config
    result, port = deployment
    cfg = load_runtime_config(result.runtime_config)
    assert cfg.ingest.workers == 2 and len(cfg.ingest.passwords) == 2
    runtime = MqttTransport.from_config(cfg.broker, "edgefl-runtime")
    workers = [MqttTransport.from_config(cfg.ingest.broker_for(cfg.broker, k), f"edgefl-ingest-{RUN}-{k}")
               for k in range(2)]
    probes = []
    try:
        for t in (runtime, *workers):
            t.connect(timeout=10)
        time.sleep(1.0)
        assert runtime.connected and all(w.connected for w in workers)   # no session takeover among them
        for t in (runtime, *workers):
            t.close()
        w0 = Probe(port, result.ca_file, "cloud-runtime-ingest-0", cfg.ingest.passwords[0])
        dev0 = Probe(port, result.ca_file, "dev0", _password(result, "dev0"))
        dev1 = Probe(port, result.ca_file, "dev1", _password(result, "dev1"))
        probes += [w0, dev0, dev1]
        assert not w0.connected().is_failure and not dev0.connected().is_failure and not dev1.connected().is_failure
        w0.subscribe(f"edgefl/v1/{RUN}/dev/+/up/+")      # granted; the broker delivers only what the ACL lets it read
        # each device may publish on its own shard's topic only (dev0: shard 1 of 2, dev1: shard 0): a topic per
        # shard it chose would let one credential leave any number of retained messages on the broker
        assert [ingest_shard(RUN, d, 2) for d in ("dev0", "dev1")] == [1, 0]
        assert not dev0.publish(f"edgefl/v1/{RUN}/dev/dev0/up/1", b"shard 1").is_failure
        assert dev0.publish(f"edgefl/v1/{RUN}/dev/dev0/up/0", b"not its shard").value == 135
        assert dev0.publish(f"edgefl/v1/{RUN}/dev/dev0/up/junk", b"junk", retain=True).value == 135
        assert not dev1.publish(f"edgefl/v1/{RUN}/dev/dev1/up/0", b"shard 0").is_failure
        deadline = time.monotonic() + 5
        while not w0.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert w0.messages == [(f"edgefl/v1/{RUN}/dev/dev1/up/0", b"shard 0")]     # not another worker's shard
        assert not w0.publish(f"edgefl/v1/{RUN}/ingest/0", b"forward").is_failure
        assert not w0.publish(f"edgefl/v1/{RUN}/dev/dev1/down", b"progress").is_failure
        assert w0.publish(f"edgefl/v1/{RUN}/ingest/1", b"forged").value == 135
        assert w0.publish(f"edgefl/v1/{RUN}/ingest/0/verdict", b"forged").value == 135
        assert dev0.publish(f"edgefl/v1/{RUN}/ingest/0", b"forged").value == 135
        assert dev0.publish(f"edgefl/v1/{RUN}/dev/dev1/up/1", b"another's").value == 135
    finally:
        for p in probes:
            p.close()
        for t in (runtime, *workers):
            t.close()


def test_generated_agent_config_connects_with_the_sdk_transport(deployment):
    result, port = deployment
    cfg = load_agent_config(result.agent_configs["dev1"])
    assert cfg.broker.url.startswith("mqtts://") and cfg.broker.username == "dev1"
    got: queue.Queue = queue.Queue()
    runtime = Probe(port, result.ca_file, "cloud-runtime", _password(result, "cloud-runtime"))
    transport = MqttTransport.from_config(cfg.broker, "dev1")
    try:
        assert not runtime.connected().is_failure
        runtime.subscribe(f"edgefl/v1/{RUN}/dev/dev1/hb")
        transport.connect(timeout=10)
        transport.subscribe(f"edgefl/v1/{RUN}/dev/dev1/down", lambda topic, payload: got.put(payload))
        time.sleep(0.3)
        transport.publish(f"edgefl/v1/{RUN}/dev/dev1/hb", b"alive")
        runtime.publish(f"edgefl/v1/{RUN}/dev/dev1/down", b"hello dev1")
        assert got.get(timeout=5) == b"hello dev1"
        deadline = time.monotonic() + 5
        while not runtime.messages and time.monotonic() < deadline:
            time.sleep(0.02)
        assert runtime.messages == [(f"edgefl/v1/{RUN}/dev/dev1/hb", b"alive")]
        transport.publish(f"edgefl/v1/{RUN}/dev/dev0/up", b"not mine")  # the SDK surfaces the refusal
        deadline = time.monotonic() + 5
        while transport.refused_publishes == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert transport.refused_publishes == 1
    finally:
        transport.close()
        runtime.close()


def test_reprovisioning_keeps_credentials_and_adds_devices(tmp_path):
    first = provision(tmp_path, ["dev0"], host="127.0.0.1", port=8883)
    before = yaml.safe_load(first.agent_configs["dev0"].read_text())["broker"]["password"]
    second = provision(tmp_path, ["dev1"], host="127.0.0.1", port=8883)
    assert yaml.safe_load(second.agent_configs["dev1"].read_text())["broker"]["password"] != before
    assert yaml.safe_load(first.agent_configs["dev0"].read_text())["broker"]["password"] == before
    users = [line.split(":")[0] for line in (tmp_path / "broker" / "passwd").read_text().splitlines()]
    assert sorted(users) == ["cloud-runtime", "dev0", "dev1"]
    assert oct(first.agent_configs["dev0"].stat().st_mode & 0o777) == "0o600"
    with pytest.raises(ValueError, match="reserved"):
        provision(tmp_path, ["cloud-runtime"])
    with pytest.raises(ValueError, match="must be 1-128 characters"):
        provision(tmp_path, ["dev/1"])


def test_plaintext_to_a_remote_broker_is_refused_unless_explicitly_allowed(tmp_path):
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(yaml.safe_dump({"device_id": "dev0", "broker": {"url": "mqtt://broker.example.org:1883"},
                                   "data": {"dataset": "fashion_mnist"}}))
    with pytest.raises(ConfigError, match="broker.url: plaintext mqtt:// to a non-loopback host"):
        load_agent_config(cfg)
    assert load_agent_config(cfg, ["broker.allow_insecure=true"]).broker.allow_insecure
    assert load_agent_config(None, ["device_id=dev0", "broker.url=mqtt://127.0.0.1:1883"])  # local simulation


def test_wrong_credentials_and_a_foreign_ca_are_configuration_errors_said_at_once(deployment, tmp_path):
    """A daemon retries what waiting can fix and exits 2 on what it cannot (issue 14, item 5)."""
    from edgefl_core.transport.mqtt import BrokerConfigError
    result, port = deployment
    wrong = MqttTransport(f"mqtts://127.0.0.1:{port}", "dev0", username="dev0", password="not-it",
                          ca_file=str(result.ca_file))
    started = time.monotonic()
    with pytest.raises(BrokerConfigError, match="refused user 'dev0'.*broker.password"):
        wrong.connect(timeout=30)
    assert time.monotonic() - started < 15
    other = provision(tmp_path / "other", ["x"], host="127.0.0.1", port=port)
    foreign = MqttTransport(f"mqtts://127.0.0.1:{port}", "dev0", username="dev0", password=_password(result, "dev0"),
                            ca_file=str(other.ca_file))
    started = time.monotonic()
    with pytest.raises(BrokerConfigError, match="does not verify against ca_file"):
        foreign.connect(timeout=30)
    assert time.monotonic() - started < 15
    plain = MqttTransport(f"mqtt://127.0.0.1:{free_port()}", "dev0")
    with pytest.raises(ConnectionError, match="connection refused") as refused:
        plain.connect(timeout=30)
    assert not isinstance(refused.value, ConfigError)  # waiting can fix this one: the daemon retries
