"""What the runtime sends to devices: round announcements, acks and chunked transfers, with byte counts.

Strategies talk to devices only through this (never through the transport), so they run the same
over MQTT and over the in-memory bus.
"""
from __future__ import annotations

from cloud_runtime.ingest import Ingest
from cloud_runtime.registry import DeviceRegistry
from edge_sdk import protocol as P
from edgefl_core.transport import Transport


class Downlink:
    def __init__(self, transport: Transport, topics: P.Topics, session: str, registry: DeviceRegistry,
                 ingest: Ingest, recipe: dict | None = None):
        self.transport, self.topics, self.session = transport, topics, session
        self.registry, self.ingest = registry, ingest
        # the run recipe (RunRecipe as a dict, plus per-device edge overrides) rides on every HELLO and
        # ROUND, so a device that starts late (and sees only the retained latest) still learns the run
        self.recipe = recipe or {}

    def _with_recipe(self, type_: str, data: dict) -> dict:
        return {**data, **self.recipe} if type_ in (P.HELLO, P.ROUND) else data

    def broadcast(self, type_: str, round_: int, retain: bool = True, **data) -> None:
        """A control frame on the run-wide control topic (retained: late joiners see the latest)."""
        self.transport.publish(self.topics.control, P.control_frame(
            type_, run=self.topics.run, device="*", round_=round_, **self._with_recipe(type_, data)), retain=retain)

    def send(self, device: str, type_: str, round_: int, **data) -> None:
        """A control frame on one device's downlink."""
        self.transport.publish(self.topics.down(device), P.control_frame(
            type_, run=self.topics.run, device=device, round_=round_, **self._with_recipe(type_, data)))

    def ack(self, device: str, done: P.CompletedTransfer, accepted: bool = True, reason: str | None = None) -> None:
        """The verdict on a completed transfer (QoS 1): the device's upload is done only once it has this."""
        self.send(device, P.ACK, done.round, transfer=done.transfer, final=True, accepted=accepted, reason=reason)

    def progress(self, device: str, round_: int, data: dict) -> None:
        """An answer to a chunk's ``ack`` request (QoS 0: advisory; a lost one costs the sender a timeout)."""
        self.transport.publish(self.topics.down(device), P.control_frame(
            P.ACK, run=self.topics.run, device=device, round_=round_, **data), qos=0)

    def send_transfer(self, device: str, blob: bytes, round_: int, meta: dict) -> None:
        """Chunk a packed transfer onto one device's downlink and count its bytes."""
        frames = P.chunk_transfer(blob, run=self.topics.run, device=device, round_=round_, meta=meta)
        for frame in frames:
            self.transport.publish(self.topics.down(device), frame)
        self.ingest.count("down", device, sum(map(len, frames)))

    def send_arrays(self, devices: list[str], arrays: dict, round_: int, meta: dict) -> None:
        """Pack once, send to each of ``devices``."""
        blob = P.pack_arrays(arrays)
        for device in devices:
            self.send_transfer(device, blob, round_, meta)
