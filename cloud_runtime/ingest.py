"""Ingest: chunks -> transfers -> checked uploads. What a strategy accepts has passed everything here.

Owns the reassembler, the byte counters, and each device's sample ids. Uplink bytes are counted once
each, as what became of them (per round and per device): ``up``, the wire bytes of accepted transfers,
each chunk's first copy, counted at acceptance; ``resent``, copies of chunks already held (retransmissions,
redeliveries) and accepted transfers that replace an upload of the same round the runtime already held;
``rejected``, chunks refused and transfers rejected or dropped incomplete (expired, forgotten when their
device re-registered). Sample ids are
per-device names (the server keys every sample by (device, id) and answers soft labels per device),
so no device can claim, block or overwrite another device's samples by construction: a device that
uploads the ids of others' samples only names its own. Each split's ids are the same set every round.
"""
from __future__ import annotations

import hashlib

from collections import Counter

import numpy as np

from cloud_runtime.config import RuntimeConfig
from cloud_runtime.registry import DeviceRegistry, Rejected
from edge_sdk import protocol as P
from cloud_runtime.features import HeldUpload
from edge_sdk.messages import MessageError

BYTE_KINDS = ("up", "resent", "rejected", "down")  # see the module docstring


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
        # this round's bytes by what became of them ("up", "resent", "rejected"; "down": the downlink), per device
        self.round_bytes: dict[str, Counter] = {kind: Counter() for kind in BYTE_KINDS}
        self.round_raw: Counter = Counter()     # device -> what this round's accepted uploads would cost as raw fp32
        self.device_ids: dict[str, dict[str, np.ndarray]] = {}                   # device -> split -> pinned ids

    def new_round(self) -> None:
        for counter in self.round_bytes.values():
            counter.clear()
        self.round_raw.clear()

    def count(self, kind: str, device: str, wire: int) -> None:
        """Charge ``wire`` bytes of ``kind`` (:data:`BYTE_KINDS`) to a registered device, this round and in total
        (``devices[device]["bytes_<kind>"]``). Bytes of unregistered devices are not counted (their messages are
        rejected as ``unknown_device``, and counting them would let anyone grow the report)."""
        info = self.registry.devices.get(device)
        if info is None or wire <= 0:
            return
        self.round_bytes[kind][device] += wire
        info[f"bytes_{kind}"] = info.get(f"bytes_{kind}", 0) + wire
        self.registry.telemetry.counters.bytes(kind, wire)

    def add_chunk(self, device: str, header: dict, body: bytes, wire: int) -> P.CompletedTransfer | None:
        """Reassemble; the completed transfer once its last chunk is in. A copy of a chunk already held is
        counted as re-sent, a refused chunk (and a transfer it made fail) as rejected; a first copy is counted
        with its transfer, once that is judged (:meth:`count_accepted`, or rejected by the caller)."""
        if device not in self.registry.devices:
            raise Rejected("unknown_device", "upload before registration")
        duplicates = self.reassembler.duplicates
        try:
            done = self.reassembler.add(header, body, wire)
        except P.ProtocolError:
            dropped = self.reassembler.take_dropped()  # a transfer failing its sha256 (this chunk included)
            if not dropped:
                self.count("rejected", device, wire)
            for owner, held in dropped.items():
                self.count("rejected", owner, held)
            raise
        if self.reassembler.duplicates > duplicates:
            self.count("resent", device, wire)
        if done is not None and done.meta.get("kind") == P.KIND_UPLOAD and done.meta.get("split") == "train":
            self.note_release(device, done.blob, done.sha256)
        return done

    def note_release(self, device: str, blob: bytes, sha256: str = "") -> None:
        """A training-feature upload the runtime has seen (accepted or not): each distinct payload released
        every sample of ``device`` once (a device re-sends a round bit for bit: its noise is a function of the
        features, so a copy is no new release). Counted for feature privacy's ε (``cloud_runtime/privacy.py``)."""
        seen = self.registry.devices[device].setdefault("feature_releases", [])
        digest = (sha256 or hashlib.sha256(blob).hexdigest())[:16]  # the reassembler verified it: not hashed twice
        if digest not in seen and len(seen) < 100_000:
            seen.append(digest)

    def count_accepted(self, device: str, done: P.CompletedTransfer, replaced: bool) -> None:
        """An accepted transfer: its wire bytes are upload, and its fp32-equivalent size is credited, once. One
        that replaces an upload of the same round the runtime already held (a device re-sending what was not
        lost) adds no raw size and its bytes count as re-sent."""
        raw = done.meta.get("raw_fp32_bytes", 0)
        raw = raw if type(raw) is int and 0 <= raw < 1 << 50 and not replaced else 0
        self.round_raw[device] += raw
        self.registry.devices[device]["raw_fp32_bytes"] += raw
        self.count("resent" if replaced else "up", device, done.wire_bytes)

    def count_rejected(self, device: str, wire: int) -> None:
        self.count("rejected", device, wire)

    def _collect_dropped(self) -> None:
        for device, held in self.reassembler.take_dropped().items():
            self.count("rejected", device, held)

    def expired(self, now: float | None = None) -> list[tuple[str, str]]:
        """Transfers idle past the timeout, dropped: their bytes count as rejected."""
        keys = self.reassembler.expire(now)
        self._collect_dropped()
        return keys

    def forget(self, device: str) -> int:
        """Drop ``device``'s open transfers (it re-registered: their senders are gone); their bytes count as
        rejected. Returns how many."""
        n = self.reassembler.forget(device)
        self._collect_dropped()
        return n

    # -- feature uploads ----------------------------------------------------------------------------

    def decoded_limit(self, device: str, split, num_classes: int | None, feature_shape: tuple | None,
                      extractor_bytes: int | None) -> int:
        """Bytes an upload of ``split`` ("train" or "test"; anything else is judged as "train") from ``device``
        may decompress to: its registered sample count times an fp32 sample (features, logits, id, label), plus
        the extractor when averaging, plus 1 MiB of headers. A transfer stating a larger size is refused before
        anything is allocated."""
        split = split if split in ("train", "test") else "train"
        samples = self.registry.devices[device].get(f"{split}_samples") or 0
        feature = int(np.prod(feature_shape)) if feature_shape else 4 * 256 * 256 * 16
        per_sample = 4 * feature + 4 * (num_classes or 100_000) + 16
        limit = samples * per_sample + (extractor_bytes if extractor_bytes is not None else 64 << 20) + (1 << 20)
        return min(limit, self.cfg.max_decoded_bytes)

    def decode_upload(self, device: str, done: P.CompletedTransfer, num_classes: int | None,
                      feature_shape: tuple | None, extractor_bytes: int | None = None
                      ) -> tuple[HeldUpload, dict[str, np.ndarray]]:
        """Decode and check an upload once, on its compact form (``features.py``): shapes, classes, finiteness,
        plausible magnitudes, id ownership. Returns the upload and the device's extractor arrays (empty unless
        extractor averaging is on). Nothing is recorded: the caller claims the ids (:meth:`claim`) once it has
        accepted the upload. Raises ProtocolError or Rejected naming what is wrong."""
        check_upload_meta(done.meta)
        arrays = P.unpack_arrays(done.blob, self.decoded_limit(device, done.meta.get("split"), num_classes,
                                                               feature_shape, extractor_bytes), done.packed)
        upload = HeldUpload.from_arrays(arrays, done.meta, device, done.round)
        try:
            peak = upload.validate(num_classes, feature_shape, limit=self.cfg.validation.max_abs_feature)
        except MessageError as e:
            raise Rejected("non_finite" if "NaN" in str(e) else "bad_shape", str(e)) from None
        meta = done.meta
        if "samples" in meta and meta["samples"] != len(upload.sample_ids):
            raise Rejected("bad_payload", f"meta.samples {meta['samples']}, the arrays hold {len(upload.sample_ids)}")
        if "feature_shape" in meta and tuple(meta["feature_shape"]) != upload.features.shape[1:]:
            raise Rejected("bad_shape", f"meta.feature_shape {meta['feature_shape']}, the features are "
                                        f"{list(upload.features.shape[1:])}")
        self._check_plausible(upload, peak)
        self._check_ownership(device, upload)
        extractor = {k[len(P.EXTRACTOR_PREFIX):]: v for k, v in arrays.items() if k.startswith(P.EXTRACTOR_PREFIX)}
        if upload.split == "train":  # training features are held as server.feature_storage says; test ones as sent
            upload = upload.stored(self.cfg.server.feature_storage, peak)
        return upload, extractor

    def _check_plausible(self, upload: HeldUpload, feature_peak: float) -> None:
        v = self.cfg.validation
        logit_peak = float(np.abs(upload.logits).max()) if upload.logits.size else 0.0
        for name, peak, bound in (("features", feature_peak, v.max_abs_feature),
                                  ("logits", logit_peak, v.max_abs_logit)):
            if peak > bound:
                raise Rejected("implausible_values", f"{upload.split} {name}: max |value| {peak:.3g} > {bound:g}")

    def _check_ownership(self, device: str, upload: HeldUpload) -> None:
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

    def claim(self, device: str, upload: HeldUpload) -> None:
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
