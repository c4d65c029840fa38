"""Ingest: chunks -> transfers -> checked uploads. What a strategy accepts has passed everything here.

Owns the reassembler, the per-round byte counters, and each device's sample ids. Sample ids are
per-device names (the server keys every sample by (device, id) and answers soft labels per device),
so no device can claim, block or overwrite another device's samples by construction: a device that
uploads the ids of others' samples only names its own. Each split's ids are the same set every round.
"""
from __future__ import annotations

from collections import Counter

import numpy as np

from cloud_runtime.config import RuntimeConfig
from cloud_runtime.registry import DeviceRegistry, Rejected
from edge_sdk import protocol as P
from edge_sdk.messages import FeatureUpload, MessageError


def check_upload_meta(meta: dict) -> None:
    """Every field an upload's meta may carry has its type (what :func:`edgefl_core.codecs.encode_upload`
    writes); unknown fields are ignored. Raises Rejected("bad_payload") naming the field."""
    for key, ok in (("kind", lambda v: isinstance(v, str)), ("split", lambda v: v in ("train", "test")),
                    ("codec", lambda v: isinstance(v, str)),
                    ("samples", lambda v: type(v) is int and 0 <= v <= 10**9),
                    ("feature_shape", lambda v: isinstance(v, list) and len(v) <= 8
                     and all(type(x) is int and 0 <= x <= 1 << 20 for x in v)),
                    ("raw_fp32_bytes", lambda v: type(v) is int and 0 <= v < 1 << 50),
                    ("metrics", lambda v: v is None or isinstance(v, dict))):
        if key in meta and not ok(meta[key]):
            raise Rejected("bad_payload", f"meta.{key} = {str(meta[key])[:40]!r} is not what an upload carries")
    for key in ("kind", "split", "codec"):
        if key not in meta:
            raise Rejected("bad_payload", f"meta.{key} missing")


class Ingest:
    def __init__(self, cfg: RuntimeConfig, registry: DeviceRegistry):
        self.cfg = cfg
        self.registry = registry
        self.reassembler = P.Reassembler(cfg.max_transfer_bytes, cfg.transfer_timeout_s, max_chunk=cfg.max_chunk_bytes,
                                         max_pending_bytes_per_device=cfg.max_pending_bytes_per_device)
        self.round_bytes: Counter = Counter()   # device -> uplink wire bytes this round ("down:<device>" downlink)
        self.round_raw: Counter = Counter()     # device -> what the same uploads would cost as raw fp32
        self.device_ids: dict[str, dict[str, np.ndarray]] = {}                   # device -> split -> pinned ids

    def new_round(self) -> None:
        self.round_bytes.clear()
        self.round_raw.clear()

    def add_chunk(self, device: str, header: dict, body: bytes, wire: int) -> P.CompletedTransfer | None:
        """Count the chunk's bytes and reassemble; the completed transfer once its last chunk is in."""
        if device not in self.registry.devices:
            raise Rejected("unknown_device", "upload before registration")
        done = self.reassembler.add(header, body, wire)  # raises on a bad chunk: then nothing is counted
        self.round_bytes[device] += wire
        self.registry.devices[device]["bytes_up"] += wire
        return done

    def count_raw(self, device: str, meta: dict, replaced: bool) -> None:
        """Credit the fp32-equivalent size of an accepted transfer once (a resend that replaces does not)."""
        raw = meta.get("raw_fp32_bytes", 0)
        raw = raw if type(raw) is int and 0 <= raw < 1 << 50 and not replaced else 0
        self.round_raw[device] += raw
        self.registry.devices[device]["raw_fp32_bytes"] += raw

    def expired(self) -> list[tuple[str, str]]:
        return self.reassembler.expire()

    # -- feature uploads ----------------------------------------------------------------------------

    def decoded_limit(self, device: str, split: str, num_classes: int | None, feature_shape: tuple | None,
                      extractor_bytes: int | None) -> int:
        """Bytes an upload of ``split`` from ``device`` may decompress to: its registered sample count times
        an fp32 sample (features, logits, id, label), plus the extractor when averaging, plus 1 MiB of headers.
        A transfer stating a larger size is refused before anything is allocated."""
        samples = self.registry.devices[device].get(f"{split}_samples") or 0
        feature = int(np.prod(feature_shape)) if feature_shape else 4 * 256 * 256 * 16
        per_sample = 4 * feature + 4 * (num_classes or 100_000) + 16
        limit = samples * per_sample + (extractor_bytes if extractor_bytes is not None else 64 << 20) + (1 << 20)
        return min(limit, self.cfg.max_decoded_bytes)

    def decode_upload(self, device: str, done: P.CompletedTransfer, num_classes: int | None,
                      feature_shape: tuple | None, extractor_bytes: int | None = None
                      ) -> tuple[FeatureUpload, dict[str, np.ndarray]]:
        """Decode and check an upload: shapes, classes, finiteness, plausible magnitudes, id ownership.
        Returns the upload and the device's extractor arrays (empty unless extractor averaging is on).
        Nothing is recorded: the caller claims the ids (:meth:`claim`) once it has accepted the upload."""
        check_upload_meta(done.meta)
        split = done.meta.get("split")
        arrays = P.unpack_arrays(done.blob, self.decoded_limit(device, split if split in ("train", "test") else "train",
                                                               num_classes, feature_shape, extractor_bytes))
        upload = P.arrays_to_upload(arrays, done.meta, device, done.round)
        try:
            upload.validate(num_classes, feature_shape)
        except MessageError as e:
            raise Rejected("non_finite" if "NaN" in str(e) else "bad_shape", str(e)) from None
        meta = done.meta
        if "samples" in meta and meta["samples"] != len(upload.sample_ids):
            raise Rejected("bad_payload", f"meta.samples {meta['samples']}, the arrays hold {len(upload.sample_ids)}")
        if "feature_shape" in meta and tuple(meta["feature_shape"]) != tuple(upload.features.shape[1:]):
            raise Rejected("bad_shape", f"meta.feature_shape {meta['feature_shape']}, the features are "
                                        f"{list(upload.features.shape[1:])}")
        self._check_plausible(upload)
        self._check_ownership(device, upload)
        extractor = {k[len(P.EXTRACTOR_PREFIX):]: v for k, v in arrays.items() if k.startswith(P.EXTRACTOR_PREFIX)}
        return upload, extractor

    def _check_plausible(self, upload: FeatureUpload) -> None:
        v = self.cfg.validation
        for name, tensor, bound in (("features", upload.features, v.max_abs_feature),
                                    ("logits", upload.logits, v.max_abs_logit)):
            peak = float(tensor.abs().max()) if tensor.numel() else 0.0
            if peak > bound:
                raise Rejected("implausible_values", f"{upload.split} {name}: max |value| {peak:.3g} > {bound:g}")

    def _check_ownership(self, device: str, upload: FeatureUpload) -> None:
        """The upload has as many samples as the device registered for the split, with unique ids, and the same
        ids it uploaded before. Checks only; :meth:`claim` records."""
        ids = upload.sample_ids
        declared = self.registry.devices[device].get(f"{upload.split}_samples")
        if isinstance(declared, int) and len(ids) != declared:
            raise Rejected("sample_ids", f"{len(ids)} {upload.split} samples, the device registered {declared}")
        if len(np.unique(ids)) != len(ids):
            raise Rejected("sample_ids", f"{upload.split} sample ids repeat")
        pinned = self.device_ids.get(device, {}).get(upload.split)
        if pinned is not None and (len(pinned) != len(ids) or not np.array_equal(np.sort(ids), pinned)):
            raise Rejected("sample_ids", f"{upload.split} sample ids differ from the {len(pinned)} this device "
                                         "uploaded before")

    def claim(self, device: str, upload: FeatureUpload) -> None:
        """Pin an accepted upload's ids for ``device`` (later rounds must upload the same set)."""
        self.device_ids.setdefault(device, {}).setdefault(upload.split, np.sort(upload.sample_ids))

    # -- durable state ------------------------------------------------------------------------------

    def snapshot(self) -> dict:
        return {"device_ids": {d: {split: ids.tolist() for split, ids in by_split.items()}
                               for d, by_split in self.device_ids.items()}}

    def restore(self, state: dict) -> None:
        for device, by_split in state.get("device_ids", {}).items():
            for split, ids in by_split.items():
                self.device_ids.setdefault(device, {})[split] = np.asarray(ids, dtype=np.int64)
