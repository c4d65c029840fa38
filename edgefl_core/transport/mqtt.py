"""MQTT transport on paho-mqtt 2.x (MQTT 5 by default, 3.1.1 supported).

Subscriptions are (re)made in ``on_connect`` so they survive reconnects; reconnects back off
exponentially; a Last Will marks the client offline; sessions persist across reconnects so QoS 1
messages published while a client was away are delivered when it returns.
"""
from __future__ import annotations

import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections import deque
from dataclasses import dataclass
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from edgefl_core.config import ConfigError
from edgefl_core.transport.base import Handler, Transport, topic_matches

logger = logging.getLogger(__name__)

# CONNACK reason codes that no retry can fix: the client's credentials or identity are wrong
SESSION_TAKEN_OVER = 0x8E  # DISCONNECT reason code (MQTT 5, 3.14.2.1): another client connected with this id
_AUTH_FAILURES = ("Bad user name or password", "Not authorized", "Client identifier not valid", "Banned",
                  "Bad authentication method")


class BrokerConfigError(ConfigError, ConnectionError):
    """The broker answers but will never accept this client as configured: wrong credentials, or a
    certificate that does not verify against ``ca_file``. Waiting does not help; the config must change."""


@dataclass
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        parsed = urlparse(url if "://" in url else f"mqtt://{url}")
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl"):
            raise ValueError(f"broker URL {url!r}: scheme must be mqtt:// or mqtts://")
        tls = parsed.scheme in ("mqtts", "ssl")
        if not parsed.hostname:
            raise ValueError(f"broker URL {url!r} has no host")
        return cls(parsed.hostname, parsed.port or (8883 if tls else 1883), tls)

    def probe(self, timeout: float = 3.0) -> str:
        """Why a TCP connection to the broker fails, in words (for logs: refused vs no answer vs unknown host)."""
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout):
                return "the port answers, but no MQTT session came up (TLS or credentials?)"
        except ConnectionRefusedError:
            return f"connection refused: nothing listens on {self.host}:{self.port}"
        except socket.gaierror as e:
            return f"host {self.host!r} not found ({e})"
        except (TimeoutError, socket.timeout):
            return "no answer (network down, or a firewall drops the packets)"
        except OSError as e:
            return f"{type(e).__name__}: {e}"

    def tls_problem(self, ca_file: str | None, timeout: float = 5.0) -> tuple[bool, str] | None:
        """A TLS handshake against the broker with the client's CA: None when it verifies, else (whether it
        is a configuration error: the certificate does not verify, in words)."""
        context = ssl.create_default_context(cafile=ca_file) if ca_file else ssl.create_default_context()
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as raw:
                with context.wrap_socket(raw, server_hostname=self.host):
                    return None
        except ssl.SSLCertVerificationError as e:
            message = str(e.verify_message or e.reason)
            if "not yet valid" in message or "expired" in message:
                # a clock that has not synced yet (a Pi without a real-time clock at boot) heals: keep waiting
                return False, (f"the broker's TLS certificate is {message} by this device's clock "
                               f"({time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())}): is the clock synced "
                               "(NTP)? Or the deployment's certificates expired: re-provision")
            return True, (f"the broker's TLS certificate does not verify against ca_file {ca_file or '(system CAs)'}: "
                          f"{e.verify_message or e.reason} (the broker was provisioned with another CA, or host "
                          f"{self.host!r} is not in its certificate)")
        except ssl.SSLError as e:
            return False, f"TLS handshake failed ({e.reason or e}): is port {self.port} a TLS listener?"
        except OSError as e:
            return False, f"{type(e).__name__}: {e}"

    @property
    def is_loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _delivered(info: mqtt.MQTTMessageInfo) -> bool:
    try:
        return info.is_published()
    except (RuntimeError, ValueError):  # failed for good: nothing left to wait for
        return True


class MqttTransport(Transport):
    def __init__(self, broker_url: str, client_id: str, *, will: tuple[str, bytes] | None = None,
                 username: str | None = None, password: str | None = None, ca_file: str | None = None,
                 cert_file: str | None = None, key_file: str | None = None, keepalive: int = 30,
                 mqtt5: bool = True, session_expiry_s: int = 3600):
        self.address = BrokerAddress.parse(broker_url)
        self.client_id = client_id
        self.mqtt5 = mqtt5
        self._session_expiry_s = session_expiry_s
        self._keepalive = keepalive
        self._subs: list[tuple[str, Handler, int, bool]] = []
        self.cleared_retained = 0  # retained messages dropped and cleared on retained=False subscriptions
        self._lock = threading.Lock()
        self._connected = threading.Event()
        self._refused = threading.Event()  # the broker answered the CONNECT with a failure reason code
        self._ca_file = ca_file
        self._username = username
        self._inflight: deque[mqtt.MQTTMessageInfo] = deque()  # QoS 1 publishes not yet acknowledged, in order
        self._taken_over = threading.Event()
        protocol = mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311
        self._client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                   clean_session=None if mqtt5 else False)
        self._client.max_queued_messages_set(0)  # unlimited: never drop an upload chunk client-side
        self._client.max_inflight_messages_set(64)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        if username:
            self._client.username_pw_set(username, password)
        if self.address.tls or ca_file:
            self._client.tls_set(ca_certs=ca_file, certfile=cert_file, keyfile=key_file,
                                 cert_reqs=ssl.CERT_REQUIRED, tls_version=ssl.PROTOCOL_TLS_CLIENT)
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._client.on_publish = self._on_publish
        self.last_connect_error: str | None = None
        self.refused_publishes = 0  # PUBACKs with a failure reason code (e.g. 135: not authorized by the ACL)

    @classmethod
    def from_config(cls, broker, client_id: str, will: tuple[str, bytes] | None = None) -> "MqttTransport":
        """Build from a :class:`edgefl_core.transport.config.BrokerConfig`."""
        return cls(broker.url, client_id, will=will, username=broker.username, password=broker.password,
                   ca_file=broker.ca_file, cert_file=broker.cert_file, key_file=broker.key_file,
                   keepalive=broker.keepalive, mqtt5=broker.mqtt5)

    # -- paho callbacks (network thread) ----------------------------------------------------------

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        if reason_code.is_failure:
            self.last_connect_error = str(reason_code)
            logger.warning("%s: broker refused the connection: %s", self.client_id, reason_code)
            self._refused.set()
            return
        sock = client.socket()
        try:  # small control frames and PUBACKs must not wait out Nagle's algorithm against delayed ACKs (~40 ms)
            raw = getattr(sock, "_sock", sock)  # under TLS paho may hand out a wrapper
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (AttributeError, OSError):
            pass
        with self._lock:
            subs = list(self._subs)
        for topic_filter, _, qos, _ in subs:
            client.subscribe(topic_filter, qos=qos)
        self._connected.set()
        logger.debug("%s connected to %s:%d", self.client_id, self.address.host, self.address.port)

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        self._connected.clear()
        if reason_code.value == SESSION_TAKEN_OVER:
            # Another process logged in with this client id. Reconnecting would take the session back and start
            # a fight that only ends when one of them stops: this one stops reconnecting instead.
            self._taken_over.set()
            logger.error("%s: another client connected with this client id and took over the session; not "
                         "reconnecting (run one process per identity)", self.client_id)
            client.disconnect()  # the socket is closed already: this only ends paho's reconnect loop
            return
        if reason_code.is_failure:
            logger.warning("%s disconnected (%s); reconnecting", self.client_id, reason_code)

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        if reason_code.is_failure:  # the broker took the packet but will not deliver it: say so loudly
            self.refused_publishes += 1
            logger.error("%s: broker refused publish mid=%d: %s (check this device's ACL)", self.client_id, mid,
                         reason_code)

    def _on_message(self, client, userdata, message):
        with self._lock:
            matching = [(h, keep) for f, h, _, keep in self._subs if topic_matches(f, message.topic)]
        handlers = [h for h, keep in matching if keep or not message.retain]
        if message.retain and len(handlers) < len(matching) and message.payload:
            self.cleared_retained += 1
            logger.warning("%s: ignored and cleared a retained message on %s", self.client_id, message.topic)
            client.publish(message.topic, b"", qos=1, retain=True)
        for handler in handlers:
            try:
                handler(message.topic, message.payload)
            except Exception:  # a handler bug must not kill the network thread
                logger.exception("%s: handler for %s failed", self.client_id, message.topic)

    # -- Transport ---------------------------------------------------------------------------------

    def connect(self, timeout: float = 30.0) -> None:
        kwargs: dict = {}
        if self.mqtt5:  # 3.1.1 takes clean_session=False in the constructor instead
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self._session_expiry_s
            kwargs = {"clean_start": False, "properties": props}
        self._refused.clear()
        reason = self.address.probe(timeout=min(timeout, 5.0))
        if not reason.startswith("the port answers"):  # refused, unknown host, no answer: say so now
            raise ConnectionError(f"{self.client_id}: no connection to {self.address.host}:{self.address.port} "
                                  f"({reason})")
        self._client.connect_async(self.address.host, self.address.port, keepalive=self._keepalive, **kwargs)
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        tls_checked = not self.address.tls
        while not self._connected.wait(0.1):
            if self._refused.is_set() or time.monotonic() >= deadline:
                break
            if not tls_checked and time.monotonic() >= deadline - timeout + 2:  # slow: a certificate problem?
                tls_checked = True
                problem = self.address.tls_problem(self._ca_file)
                if problem is not None and problem[0]:
                    self._client.loop_stop()
                    raise BrokerConfigError(f"{self.address.host}:{self.address.port}: {problem[1]}")
        if self._connected.is_set():
            return
        self._client.loop_stop()
        where = f"{self.address.host}:{self.address.port}"
        error = self.last_connect_error if self._refused.is_set() else None
        if error and any(error.startswith(code) for code in _AUTH_FAILURES):
            raise BrokerConfigError(f"the broker at {where} refused user {self._username!r}: {error}. Check "
                                    "broker.username and broker.password (cloud-runtime provision wrote them; the "
                                    "broker's password file must be the same deployment's: after re-provisioning, "
                                    "restart mosquitto)")
        if error:
            raise ConnectionError(f"{self.client_id}: the broker at {where} refused the connection: {error}")
        reason = self.address.probe()
        if self.address.tls and reason.startswith("the port answers"):
            problem = self.address.tls_problem(self._ca_file)
            if problem is not None and problem[0]:
                raise BrokerConfigError(f"{where}: {problem[1]}")
            reason = problem[1] if problem is not None else "TLS verifies, but no MQTT session came up in time"
        raise ConnectionError(f"{self.client_id}: no connection to {where} within {timeout:.0f}s ({reason})")

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            raise ConnectionError(f"{self.client_id}: publish to {topic} failed: {mqtt.error_string(info.rc)}")
        if qos > 0:
            if info.rc == mqtt.MQTT_ERR_NO_CONN:
                # Disconnected (broker restart, flaky link): paho keeps the QoS>0 message and sends it after
                # the reconnect, but its info would report NO_CONN forever; track the delivery instead.
                info.rc = mqtt.MQTT_ERR_SUCCESS
            with self._lock:
                # acknowledgements arrive roughly in order: dropping the delivered head keeps this O(1) amortized
                while self._inflight and _delivered(self._inflight[0]):
                    self._inflight.popleft()
                self._inflight.append(info)

    def subscribe(self, topic_filter: str, handler: Handler, *, qos: int = 1, retained: bool = True) -> None:
        with self._lock:
            self._subs.append((topic_filter, handler, qos, retained))
        if self._connected.is_set():
            self._client.subscribe(topic_filter, qos=qos)

    def flush(self, timeout: float = 30.0) -> bool:
        deadline = time.monotonic() + timeout
        with self._lock:
            pending = list(self._inflight)
        for info in pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                info.wait_for_publish(remaining)
            except (RuntimeError, ValueError):
                return False
            if not info.is_published():
                return False
        return True

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    @property
    def taken_over(self) -> bool:
        return self._taken_over.is_set()

    def close(self) -> None:
        self._client.disconnect()
        self._client.loop_stop()
