"""Which broker to reach and how (``broker:`` in agent and runtime configs)."""
from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlparse

from edgefl_core.config import ConfigError, require


@dataclass
class BrokerConfig:
    url: str = "mqtt://127.0.0.1:1883"   # mqtts:// for TLS; memory://<name> for the in-process bus
    username: str | None = None
    password: str | None = None
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    keepalive: int = 30
    mqtt5: bool = True
    allow_insecure: bool = False         # plaintext/anonymous to a non-loopback broker: only if you mean it

    @property
    def scheme(self) -> str:
        return urlparse(self.url).scheme if "://" in self.url else "mqtt"

    def check(self) -> None:
        from edgefl_core.transport import TRANSPORTS
        require(self.scheme in TRANSPORTS, "url", f"scheme {self.scheme!r} of {self.url!r} is not one of "
                f"{', '.join(s + '://' for s in TRANSPORTS.names())}")
        if self.scheme == "memory":
            return
        from edgefl_core.transport.mqtt import BrokerAddress
        try:
            address = BrokerAddress.parse(self.url)
        except ValueError as e:
            raise ConfigError(f"url: {e}") from None
        require(5 <= self.keepalive <= 3600, "keepalive", "must be in [5, 3600] seconds")
        from pathlib import Path
        for key in ("ca_file", "cert_file", "key_file"):
            value = getattr(self, key)
            require(value is None or Path(value).is_file(), key, f"{value} does not exist (paths in a config file "
                    "are relative to its folder)")
        if not self.allow_insecure and not address.is_loopback:
            # Deployments use TLS and credentials (cloud-runtime provision); plaintext is for local simulation.
            require(address.tls, "url", f"plaintext mqtt:// to a non-loopback host ({address.host}) is refused; "
                    "use mqtts:// (see cloud-runtime provision) or set broker.allow_insecure: true")
            require(bool(self.username), "username", f"a non-loopback broker ({address.host}) needs credentials; "
                    "or set broker.allow_insecure: true")
