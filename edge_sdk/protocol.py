"""The protocol as the torch side speaks it: :class:`FeatureUpload` / :class:`SoftLabels` / state dicts
to wire arrays and back, plus the torch-free core's wire API re-exported as one public namespace.

The wire itself (frames, topics, codecs, chunking) lives in :mod:`edgefl_core`; this module only adds
the tensor conversions, so both sides and the tests can write ``from edge_sdk import protocol as P``.
See ``docs/PROTOCOL.md``.
"""
from __future__ import annotations

import numpy as np
import torch

from edge_sdk.messages import FeatureUpload, MessageError, SoftLabels
from edgefl_core.chunking import CompletedTransfer, Reassembler, chunk_transfer, new_transfer_id, transfer_chunks  # noqa: F401,E501
from edgefl_core.codecs import (FEATURE_CODECS, MODEL_CODECS, UploadArrays, decode_features,  # noqa: F401
                                decode_state, decode_upload, encode_features, encode_state, encode_upload,
                                pack_arrays, unpack_arrays)
from edgefl_core.wire import *  # noqa: F401,F403  (the wire API, one namespace)
from edgefl_core.wire import KIND_SOFT_LABELS, ProtocolError

CODECS = tuple(FEATURE_CODECS.names())


def _as_protocol_error(e: MessageError) -> ProtocolError:
    return ProtocolError("non_finite" if "NaN" in str(e) else "bad_shape", str(e))


def upload_to_arrays(upload: FeatureUpload, codec: str) -> tuple[dict[str, np.ndarray], dict]:
    """Encode a FeatureUpload with feature codec ``codec`` (see :func:`edgefl_core.codecs.encode_upload`)."""
    return encode_upload(UploadArrays(upload.split, upload.sample_ids, upload.features.float().numpy(),
                                      upload.logits.float().numpy(), upload.labels.numpy(), upload.metrics), codec)


def arrays_to_upload(arrays: dict[str, np.ndarray], meta: dict, device: str, round_: int) -> FeatureUpload:
    """Decode and validate an upload; every failure is a ProtocolError with a reason."""
    up = decode_upload(arrays, meta)
    upload = FeatureUpload(device, round_, up.split, up.sample_ids, torch.from_numpy(up.features),
                           torch.from_numpy(up.logits), torch.from_numpy(up.labels), up.metrics)
    try:
        upload.validate()
    except MessageError as e:
        raise _as_protocol_error(e) from None
    return upload


def soft_labels_to_arrays(message: SoftLabels) -> tuple[dict[str, np.ndarray], dict]:
    return ({"sample_ids": message.sample_ids.astype(np.int64), "logits": message.logits.float().numpy()},
            {"kind": KIND_SOFT_LABELS, "samples": len(message.sample_ids)})


def arrays_to_soft_labels(arrays: dict[str, np.ndarray], device: str, round_: int) -> SoftLabels:
    if "sample_ids" not in arrays or "logits" not in arrays:
        raise ProtocolError("bad_payload", "soft labels need sample_ids and logits")
    if arrays["sample_ids"].dtype != np.int64 or arrays["logits"].dtype != np.float32:
        raise ProtocolError("bad_dtype", "soft labels: sample_ids int64, logits float32")
    message = SoftLabels(device, round_, arrays["sample_ids"].copy(), torch.from_numpy(arrays["logits"].copy()))
    try:
        message.validate()
    except MessageError as e:
        raise _as_protocol_error(e) from None
    return message


def state_to_arrays(state: dict[str, torch.Tensor], codec: str = "fp32") -> tuple[dict[str, np.ndarray], dict]:
    """Model weights for the wire (model codec ``codec``: fp32 | fp16)."""
    return encode_state({k: v.detach().cpu().numpy() for k, v in state.items()}, codec)


def arrays_to_state(arrays: dict[str, np.ndarray], reference: dict[str, torch.Tensor] | None = None
                    ) -> dict[str, torch.Tensor]:
    """Decode model weights; names and shapes must match ``reference`` (cast to its dtypes), values finite."""
    shapes = {k: tuple(v.shape) for k, v in reference.items()} if reference is not None else None
    state = {k: torch.from_numpy(v) for k, v in decode_state(arrays, shapes).items()}
    if reference is not None:
        state = {k: v.to(reference[k].dtype) for k, v in state.items()}
    return state
