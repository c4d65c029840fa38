"""Transports by URL scheme: ``mqtt://`` / ``mqtts://`` (paho, a real broker), ``memory://name`` (in process).

``create_transport(broker_config, client_id, will=...)`` is the one factory the agent, the runtime and
the simulator use. A new transport is one module with a ``@TRANSPORTS.register("scheme")`` factory
``(broker_config, client_id, will) -> Transport``.
"""
from __future__ import annotations

from edgefl_core.registry import Registry
from edgefl_core.transport.base import Handler, Transport, topic_matches
from edgefl_core.transport.config import BrokerConfig
from edgefl_core.transport.memory import MemoryBus, MemoryTransport

TRANSPORTS: Registry = Registry("transport")


@TRANSPORTS.register("mqtt")
@TRANSPORTS.register("mqtts")
@TRANSPORTS.register("tcp")
@TRANSPORTS.register("ssl")
def _mqtt(broker: BrokerConfig, client_id: str, will: tuple[str, bytes] | None) -> Transport:
    from edgefl_core.transport.mqtt import MqttTransport  # paho only where MQTT is used
    return MqttTransport.from_config(broker, client_id, will=will)


@TRANSPORTS.register("memory")
def _memory(broker: BrokerConfig, client_id: str, will: tuple[str, bytes] | None) -> Transport:
    from edgefl_core.transport.memory import MemoryBus
    return MemoryBus.named(broker.url.split("://", 1)[1] or "default").client(client_id, will)


def create_transport(broker: BrokerConfig, client_id: str, will: tuple[str, bytes] | None = None) -> Transport:
    """The transport for ``broker.url``'s scheme. Raises RegistryError for an unknown scheme."""
    return TRANSPORTS.create(broker.scheme, broker, client_id, will)


__all__ = ["TRANSPORTS", "BrokerConfig", "Handler", "MemoryBus", "MemoryTransport", "Transport", "create_transport", "topic_matches"]
