"""The protocol as a torch-free device speaks it: the shared core's wire API in one namespace, plus the
checks of what a device receives (round announcements, soft labels) in numpy.

The agent imports this (``from edge_sdk import wire as P``); :mod:`edge_sdk.protocol` adds the torch
conversions on top for the torch side. See ``docs/PROTOCOL.md``.
"""
from __future__ import annotations

import numpy as np

from edgefl_core.chunking import CompletedTransfer, Reassembler, chunk_transfer, new_transfer_id, transfer_chunks  # noqa: F401,E501
from edgefl_core.codecs import (FEATURE_CODECS, MODEL_CODECS, UploadArrays, decode_features,  # noqa: F401
                                decode_state, decode_upload, decode_upload_meta, encode_features, encode_state,
                                encode_upload, decompress, load_arrays, pack_arrays, unpack_arrays)
from edgefl_core.wire import *  # noqa: F401,F403  (the wire API, one namespace)
from edgefl_core.wire import EXTRACTOR_PREFIX, ProtocolError


class MessageError(ValueError):
    """A message is inconsistent (shapes, dtypes, non-finite values, duplicate ids)."""


def check_sample_ids(sample_ids: np.ndarray, n: int, what: str) -> None:
    if not isinstance(sample_ids, np.ndarray) or sample_ids.ndim != 1 or sample_ids.dtype != np.int64:
        raise MessageError(f"{what}: sample_ids must be a 1-D int64 array")
    if len(sample_ids) != n:
        raise MessageError(f"{what}: {len(sample_ids)} sample ids for {n} rows")
    if len(np.unique(sample_ids)) != n:
        raise MessageError(f"{what}: duplicate sample ids")


def soft_labels_from_arrays(arrays: dict[str, np.ndarray], what: str = "soft labels"
                            ) -> tuple[np.ndarray, np.ndarray]:
    """(sample_ids N int64, logits N x K float32) of a soft-label transfer; raises ProtocolError
    (``bad_payload`` / ``bad_dtype``) or MessageError (shapes, duplicates, NaN/Inf)."""
    if "sample_ids" not in arrays or "logits" not in arrays:
        raise ProtocolError("bad_payload", "soft labels need sample_ids and logits")
    ids, logits = arrays["sample_ids"], arrays["logits"]
    if ids.dtype != np.int64 or logits.dtype != np.float32:
        raise ProtocolError("bad_dtype", "soft labels: sample_ids int64, logits float32")
    if ids.ndim != 1:
        raise MessageError(f"{what}: sample_ids must be a vector, got shape {ids.shape}")
    check_sample_ids(ids, len(ids), what)
    if logits.ndim != 2 or logits.shape[0] != len(ids):
        raise MessageError(f"{what}: logits must be {len(ids)} x K, got {tuple(logits.shape)}")
    if not np.isfinite(logits).all():
        raise MessageError(f"{what}: logits contains NaN or Inf")
    return ids.copy(), logits.copy()


def round_frame_problem(header: dict) -> str | None:
    """What is wrong with a ROUND frame's fields (None when it can be followed)."""
    data = header.get("data") or {}
    if header["round"] < 0:
        return f"round {header['round']} < 0"
    to, wait, needs = data.get("soft_labels_to", []), data.get("soft_labels_wait_s", 30.0), data.get("soft_labels_round")
    if not isinstance(to, list) or not all(isinstance(d, str) for d in to):
        return "soft_labels_to must be a list of device ids"
    if isinstance(wait, bool) or not isinstance(wait, (int, float)) or not 0 <= wait <= 86400:
        return "soft_labels_wait_s must be a number of seconds in [0, 86400]"
    if needs is not None and type(needs) is not int:
        return "soft_labels_round must be an integer or null"
    return None


def upload_blob(upload: UploadArrays, codec: str, extractor: dict[str, np.ndarray] | None = None
                ) -> tuple[bytes, dict]:
    """(blob, meta) of one split's upload for the uplink: features, logits, labels and sample ids encoded
    with the feature ``codec`` (docs/CODECS.md), plus the extractor's weights in fp32 under
    ``EXTRACTOR_PREFIX`` when the runtime averages extractors. The upload's float copies are dropped once
    encoded (a small device's peak holds one copy of the features, not two)."""
    arrays, meta = encode_upload(upload, codec)
    upload.features = upload.logits = None
    if extractor is not None:
        ext_arrays, _ = encode_state(extractor, "fp32")
        arrays.update({EXTRACTOR_PREFIX + k: v for k, v in ext_arrays.items()})
    return pack_arrays(arrays), meta
