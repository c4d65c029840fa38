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
from edge_sdk.wire import *  # noqa: F401,F403  (the torch-free wire API, one namespace)
from edge_sdk.wire import (FEATURE_CODECS, KIND_SOFT_LABELS, ProtocolError, UploadArrays, decode_state,  # noqa: F401
                           decode_upload, encode_state, encode_upload, soft_labels_from_arrays)

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
    try:
        ids, logits = soft_labels_from_arrays(arrays, f"soft labels for {device!r} (round {round_})")
    except MessageError as e:
        raise _as_protocol_error(e) from None
    return SoftLabels(device, round_, ids, torch.from_numpy(logits))


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
