"""A device's downlink: frames on its own topic and the run's control topic, checked before the agent acts on
them, and chunked transfers reassembled and decoded within what this device can need. Torch-free; the
counterpart of :mod:`edge_sdk.uplink`. Wire format: docs/PROTOCOL.md.
"""
from __future__ import annotations

import logging

import numpy as np

from edge_sdk import wire as P
from edge_sdk.wire import MessageError

logger = logging.getLogger("edgefl.agent")


class Dropped(Exception):
    """A message this device does not act on; ``str()`` says why (the agent logs and counts it)."""


class Downlink:
    """Checks what arrives for ``device`` in run ``run_id``. Every downlink transfer names this device, so the
    per-device reassembly budget is the whole budget; :meth:`expire` frees what a crashed runtime left
    half-sent."""

    def __init__(self, run_id: str, device: str, timeout_s: float = 600, max_pending: int = 64):
        self.run_id, self.device = run_id, device
        self.reassembler = P.Reassembler(timeout_s=timeout_s, max_pending_per_device=max_pending)

    def frame(self, payload: bytes) -> tuple[str, dict, dict, bytes] | None:
        """(kind, header, data, body) of a frame of this run; None for an empty payload (a retained message
        being deleted). Raises Dropped for an undecodable frame, another run's, or data that is not an object."""
        if not payload:
            return None
        try:
            header, body = P.decode_frame(payload)
        except P.ProtocolError as e:
            raise Dropped(str(e)) from None
        if header["run"] != self.run_id:
            raise Dropped(f"a frame of run {header['run'][:40]!r}")
        data = header.get("data", {})
        if not isinstance(data, dict):
            raise Dropped(f"a {header['type']} frame whose data is not an object")
        return header["type"], header, data, body

    def chunk(self, header: dict, body: bytes, size: int) -> P.CompletedTransfer | None:
        """Add one CHUNK frame (``size``: its bytes on the wire); the transfer once complete. Raises Dropped."""
        try:
            return self.reassembler.add(header, body, size)
        except (P.ProtocolError, MessageError, KeyError, ValueError) as e:
            raise Dropped(f"a downlink transfer: {e}") from None

    def expire(self) -> None:
        for _, transfer in self.reassembler.expire():
            logger.warning("%s: downlink transfer %s expired incomplete", self.device, transfer[:8])


def decode_transfer(done: P.CompletedTransfer, shapes: dict[str, tuple], train_samples: int, num_classes: int
                    ) -> dict[str, np.ndarray] | tuple[np.ndarray, np.ndarray]:
    """A completed transfer's payload: for a model or extractor, its state dict (name -> array, checked against
    ``shapes``, this device's state of that model part); for soft labels, (sample ids N int64, logits N x K
    float32) for a device of ``train_samples`` samples and ``num_classes`` classes. At most what such a
    transfer can need is decompressed. Raises Dropped naming what was wrong; nothing is applied."""
    kind = done.meta.get("kind")
    if kind not in (P.KIND_SOFT_LABELS, P.KIND_MODEL, P.KIND_EXTRACTOR):
        raise Dropped(f"a transfer of kind {str(kind)[:40]!r}")
    need = (train_samples * (8 + 4 * num_classes) if kind == P.KIND_SOFT_LABELS
            else 4 * sum(int(np.prod(shape)) for shape in shapes.values()))
    try:
        arrays = P.unpack_arrays(done.blob, (1 << 16) + 2 * need)
        if kind == P.KIND_SOFT_LABELS:
            return P.soft_labels_from_arrays(arrays, f"soft labels (round {done.round})")
        return P.decode_state(arrays, shapes)
    except (P.ProtocolError, MessageError, KeyError, ValueError) as e:
        raise Dropped(f"a {kind} transfer: {e}") from None
