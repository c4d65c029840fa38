"""Features as the cloud holds them: in the compact dtype they travelled in, checked once, on that form.

An ``int8`` upload stays uint8 with its per-channel scale and offset (``x ~= q * scale[c] + low[c]``, the
codec of ``edgefl_core/codecs.py``): 1 byte per value instead of the 4 of fp32. ``fp16`` uploads stay fp16;
``fp32`` uploads are kept as ``server.feature_storage`` says. Rows are dequantized to float32 only when a
batch needs them (:meth:`CompactFeatures.rows`).

Validation needs no pass over dequantized floats: an int8 value is ``q * scale + low`` with ``0 <= q <= 255``,
so every value is finite when the C scales and offsets are, and ``|x| <= max(|low|, |low + 255 scale|)``
per channel (exact for what the codec writes: ``low`` is the channel's minimum and ``low + 255 scale`` its
maximum). Float features take one pass in their wire dtype (NaN and Inf propagate through ``max |x|``).

:class:`FeatureStore` keeps each device's latest training upload once, by reference (no per-round
concatenation: a batch is gathered from the devices' segments), and moves segments beyond a byte budget
to memory-mapped files.
"""
from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edge_sdk.messages import FeatureUpload, MessageError
from edge_sdk.wire import check_sample_ids, decode_upload_meta
from edgefl_core.codecs import feature_codec

logger = logging.getLogger("edgefl.runtime")

FLOAT_STORAGE = {"float16": np.float16, "float32": np.float32}


@dataclass
class CompactFeatures:
    """``N x C x H x W`` features: ``data`` uint8 with per-channel ``scale`` and ``low`` (float32, length C),
    or float16 / float32 ``data`` with no scale."""

    data: np.ndarray
    scale: np.ndarray | None = None
    low: np.ndarray | None = None

    @property
    def kind(self) -> str:
        return "int8" if self.data.dtype == np.uint8 else str(self.data.dtype)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __len__(self) -> int:
        return len(self.data)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes + (self.scale.nbytes + self.low.nbytes if self.scale is not None else 0))

    def rows(self, index) -> np.ndarray:
        """float32 ``B x C x H x W`` of the rows ``index`` (an int array or a slice); dequantized here."""
        block = self.data[index]
        if self.scale is None:
            return block.astype(np.float32)
        shape = (1, -1) + (1,) * (block.ndim - 2)  # broadcast the C scales over N, H, W
        out = block.astype(np.float32)
        out *= self.scale.reshape(shape)
        out += self.low.reshape(shape)
        return out

    def tensor(self) -> torch.Tensor:
        """Every row as a float32 tensor (small sets and tests; training gathers batches instead)."""
        return torch.from_numpy(self.rows(slice(None)))

    def peak_abs(self, limit: float = float("inf")) -> float:
        """``max |x|`` over every value, as float32 rows hold it: NaN when a value is NaN, inf when one is
        infinite or overflows float32. For int8 the per-channel bound of the module docstring, made exact (from
        the channel's q range) for the channels whose bound passes ``limit``: a constant channel is written with
        scale 1, so its bound ``|low| + 255`` says nothing about its values."""
        if self.data.size == 0:
            return 0.0
        if self.scale is None:
            return float(np.max(np.abs(self.data)))
        low, scale = self.low.astype(np.float64), self.scale.astype(np.float64)  # no overflow to inf here
        if not (np.isfinite(low).all() and np.isfinite(scale).all()):
            return float("nan")
        bound = np.maximum(np.abs(low), np.abs(low + 255.0 * scale))
        for c in np.nonzero(bound > limit)[0]:  # rare: one pass over those channels' bytes
            q = self.data[:, c]
            bound[c] = max(abs(low[c] + float(q.min()) * scale[c]), abs(low[c] + float(q.max()) * scale[c]))
        peak = float(bound.max())
        # rows() computes q * scale + low in float32: a product or sum past float32's range is inf there
        float32_max = float(np.finfo(np.float32).max)
        if peak > float32_max or float(np.abs(scale).max()) * 255.0 > float32_max:
            return float("inf")
        return peak

    @classmethod
    def from_float(cls, features: np.ndarray, storage: str = "float16") -> "CompactFeatures":
        return cls(np.ascontiguousarray(features, dtype=FLOAT_STORAGE[storage]))


def features_from_arrays(arrays: dict[str, np.ndarray], codec: str) -> CompactFeatures:
    """The compact features of a decoded transfer, as the codec's own checks pass them (dtypes, scale and offset
    shapes: :meth:`edgefl_core.codecs.FeatureCodec.checked`); fp32 is checked as sent, then held as
    ``HeldUpload.stored`` says. Raises ProtocolError (``bad_codec`` / ``bad_payload`` / ``bad_dtype`` /
    ``bad_shape``)."""
    data, scale, low = feature_codec(codec).checked(arrays)
    return CompactFeatures(data, None if scale is None else scale.copy(), None if low is None else low.copy())


@dataclass
class HeldUpload:
    """A feature upload as the cloud holds it (compact features, logits in their wire dtype)."""

    device_id: str
    round: int
    split: str                  # "train" | "test"
    sample_ids: np.ndarray      # N int64
    features: CompactFeatures   # N x C x H x W
    logits: np.ndarray          # N x K float16 or float32: the edge model's logits (the server's KD teacher)
    labels: np.ndarray          # N int64
    metrics: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return self.features.nbytes + self.logits.nbytes + self.labels.nbytes + self.sample_ids.nbytes

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray], meta: dict, device: str, round_: int) -> "HeldUpload":
        """Decode a transfer's arrays without dequantizing; raises ProtocolError naming what is wrong."""
        split, codec, metrics = decode_upload_meta(arrays, meta)
        features = features_from_arrays(arrays, codec)
        return cls(device, round_, split, arrays["sample_ids"], features, arrays["logits"], arrays["labels"],
                   metrics)

    @classmethod
    def from_message(cls, upload: FeatureUpload, storage: str = "float16") -> "HeldUpload":
        """A torch :class:`FeatureUpload` (tests, the in-process API) in the held form."""
        return cls(upload.device_id, upload.round, upload.split, np.asarray(upload.sample_ids),
                   CompactFeatures.from_float(upload.features.detach().float().numpy(), storage),
                   upload.logits.detach().float().numpy(), upload.labels.numpy(), dict(upload.metrics))

    def stored(self, storage: str, peak: float) -> "HeldUpload":
        """This upload with fp32 features held as ``storage`` (``server.feature_storage``), given the features'
        ``max |x|`` that :meth:`validate` returned. int8 and fp16 stay as they are, and so do fp32 values past
        float16's range."""
        f = self.features
        if f.data.dtype != np.float32 or storage == "float32" or peak > float(np.finfo(np.float16).max):
            return self
        return HeldUpload(self.device_id, self.round, self.split, self.sample_ids,
                          CompactFeatures.from_float(f.data, storage), self.logits, self.labels, self.metrics)

    def validate(self, num_classes: int | None = None, feature_shape: tuple | None = None,
                 limit: float = float("inf")) -> float:
        """Shapes, classes, labels, ids and finiteness, on the compact form; returns the features' ``max |x|``
        (exact for int8 channels whose bound passes ``limit``: :meth:`CompactFeatures.peak_abs`). Raises
        MessageError naming what is wrong (its text says "NaN or Inf" for non-finite values)."""
        what = f"upload from {self.device_id!r} (round {self.round}, {self.split})"
        if self.split not in ("train", "test"):
            raise MessageError(f"{what}: unknown split {self.split!r}")
        n = len(self.sample_ids) if np.ndim(self.sample_ids) == 1 else -1
        if n < 0:
            raise MessageError(f"{what}: sample_ids must be a vector, got shape {np.shape(self.sample_ids)}")
        check_sample_ids(self.sample_ids, n, what)
        shape = self.features.shape
        if len(shape) != 4 or shape[0] != n or min(shape[1:]) < 1:
            raise MessageError(f"{what}: features must be {n} x C x H x W (C, H, W >= 1), got {shape}")
        if feature_shape is not None and shape[1:] != tuple(feature_shape):
            raise MessageError(f"{what}: feature shape {shape[1:]}, expected {tuple(feature_shape)}")
        if self.logits.ndim != 2 or self.logits.shape[0] != n:
            raise MessageError(f"{what}: logits must be {n} x K, got {tuple(self.logits.shape)}")
        k = self.logits.shape[1]
        if num_classes is not None and k != num_classes:
            raise MessageError(f"{what}: logits have {k} classes, expected {num_classes}")
        if self.labels.shape != (n,) or self.labels.dtype != np.int64:
            raise MessageError(f"{what}: labels must be {n} int64, got {self.labels.dtype} {tuple(self.labels.shape)}")
        if n and (self.labels.min() < 0 or self.labels.max() >= k):
            raise MessageError(f"{what}: labels outside [0, {k})")
        peak = self.features.peak_abs(limit)
        if not np.isfinite(peak):
            raise MessageError(f"{what}: features contains NaN or Inf")
        if self.logits.size and not np.isfinite(self.logits).all():
            raise MessageError(f"{what}: logits contains NaN or Inf")
        return peak


class FeatureStore:
    """Each device's latest training upload, held once (by reference, in its compact dtype).

    ``memory_bytes``: the features held in RAM; a segment that would pass it is written to a memory-mapped
    ``.npy`` file under ``spill_dir`` (the page cache then decides what stays resident). None: no limit."""

    def __init__(self, memory_bytes: int | None = None, spill_dir: str | Path | None = None):
        self.memory_bytes = memory_bytes
        self.spill_dir = Path(spill_dir) if spill_dir is not None else None
        self.segments: dict[str, HeldUpload] = {}
        self._files: dict[str, Path] = {}
        self._serial = 0

    # -- holding ------------------------------------------------------------------------------------

    def __contains__(self, device: str) -> bool:
        return device in self.segments

    def __len__(self) -> int:
        """Samples held (every device's)."""
        return sum(len(s.sample_ids) for s in self.segments.values())

    def __iter__(self):
        return iter(self.devices())

    def get(self, device: str) -> HeldUpload | None:
        return self.segments.get(device)

    def devices(self) -> list[str]:
        return sorted(self.segments)  # not arrival order: the same seed gives the same run

    def resident_bytes(self) -> int:
        return sum(s.nbytes for d, s in self.segments.items() if d not in self._files)

    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.segments.values())

    def put(self, upload: HeldUpload) -> HeldUpload:
        """Hold ``upload`` as its device's segment (replacing the one before); returns what is held (``upload``
        itself, or the same with its features in a memory-mapped file). Never raises for the disk: a spill that
        fails (disk full, I/O error) is logged and the upload is held in RAM past the budget."""
        device = upload.device_id
        previous = self.segments.get(device)
        resident = self.resident_bytes() - (previous.nbytes if previous is not None and device not in self._files
                                            else 0)
        path = None
        if self.memory_bytes is not None and self.spill_dir is not None and resident + upload.nbytes > self.memory_bytes:
            try:
                upload, path = self._spill(upload)
            except OSError as e:
                logger.error("%s: features could not be memory-mapped under %s (%s): held in RAM, past "
                             "server.feature_memory_bytes", device, self.spill_dir, e.strerror or e)
        self.drop(device)
        self.segments[device] = upload
        if path is not None:
            self._files[device] = path
        return upload

    def drop(self, device: str) -> None:
        self.segments.pop(device, None)
        path = self._files.pop(device, None)
        if path is not None:
            path.unlink(missing_ok=True)  # an open memmap keeps its pages until its last reference goes

    def clear(self) -> None:
        """Drop every segment and its file (the run is over: nothing reads them again)."""
        for device in list(self.segments):
            self.drop(device)

    def remove_leftovers(self) -> int:
        """Delete spill files an earlier process left (the store is rebuilt from uploads, never reloaded)."""
        if self.spill_dir is None or not self.spill_dir.is_dir():
            return 0
        old = [p for p in self.spill_dir.glob("*.npy") if p not in self._files.values()]
        for p in old:
            p.unlink(missing_ok=True)
        return len(old)

    def _spill(self, upload: HeldUpload) -> tuple[HeldUpload, Path]:
        """The same upload with its feature values in a memory-mapped file (named by a hash: device names are
        not file names). Written with plain writes, then mapped read-only: a full disk is an OSError here, not a
        SIGBUS when a write through a mapping finds no block."""
        self.spill_dir.mkdir(parents=True, exist_ok=True)
        self._serial += 1
        name = hashlib.sha256(upload.device_id.encode()).hexdigest()[:16]
        path = self.spill_dir / f"{name}.{self._serial}.npy"
        try:
            with open(path, "wb") as f:
                np.save(f, np.ascontiguousarray(upload.features.data))
                f.flush()
                os.fsync(f.fileno())
            mapped = np.load(path, mmap_mode="r")
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        features = CompactFeatures(mapped, upload.features.scale, upload.features.low)
        logger.info("%s: %.1f MB of features memory-mapped to %s (server.feature_memory_bytes reached)",
                    upload.device_id, upload.features.nbytes / 1e6, path)
        return HeldUpload(upload.device_id, upload.round, upload.split, upload.sample_ids, features,
                          upload.logits, upload.labels, upload.metrics), path

    # -- reading ------------------------------------------------------------------------------------

    def layout(self) -> tuple[list[str], np.ndarray]:
        """Devices in order and the offsets of their rows in the store's global row order (length D + 1)."""
        devices = self.devices()
        sizes = [len(self.segments[d].sample_ids) for d in devices]
        return devices, np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])

    def _by_segment(self, index: np.ndarray, devices: list[str], offsets: np.ndarray):
        """For each device segment holding some of the global rows ``index``: (positions in ``index``, the
        segment's own rows, the segment)."""
        part = np.searchsorted(offsets, index, side="right") - 1   # which device's segment holds each row
        for p in np.unique(part):
            where = np.nonzero(part == p)[0]
            yield where, index[where] - offsets[p], self.segments[devices[p]]

    def _targets(self, index: np.ndarray, devices: list[str]) -> tuple[HeldUpload, np.ndarray, np.ndarray]:
        """The first segment (for shapes), and empty teacher logits (float32 ``B x K``) and labels (``B``)."""
        first = self.segments[devices[0]]
        return first, np.empty((len(index), first.logits.shape[1]), np.float32), np.empty(len(index), np.int64)

    def batch(self, index: np.ndarray, devices: list[str], offsets: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(features float32 ``B x C x H x W``, teacher logits float32 ``B x K``, labels int64 ``B``) of the
        global rows ``index``, gathered from the segments without copying anything else."""
        first, logits, labels = self._targets(index, devices)
        features = np.empty((len(index),) + first.features.shape[1:], np.float32)
        for where, rows, segment in self._by_segment(index, devices, offsets):
            features[where] = segment.features.rows(rows)
            logits[where] = segment.logits[rows]
            labels[where] = segment.labels[rows]
        return features, logits, labels

    def gather(self, index: np.ndarray, devices: list[str], offsets: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray, np.ndarray]:
        """The global rows ``index`` in their compact form, for a training rank (``cloud_runtime/distributed.py``):
        (data ``B x C x H x W``, scale ``B x C`` | None, low ``B x C`` | None, teacher logits float32 ``B x K``,
        labels int64 ``B``). When every segment is int8, data is uint8 and each row carries its device's scale
        and offset (dequantized later exactly as :meth:`CompactFeatures.rows` does); otherwise data is float32
        rows (:meth:`batch`) and scale and low are None."""
        if not all(self.segments[d].features.scale is not None for d in devices):
            features, logits, labels = self.batch(index, devices, offsets)
            return features, None, None, logits, labels
        first, logits, labels = self._targets(index, devices)
        data = np.empty((len(index),) + first.features.shape[1:], np.uint8)
        scale = np.empty((len(index), first.features.shape[1]), np.float32)
        low = np.empty_like(scale)
        for where, rows, segment in self._by_segment(index, devices, offsets):
            data[where] = segment.features.data[rows]
            scale[where] = segment.features.scale
            low[where] = segment.features.low
            logits[where] = segment.logits[rows]
            labels[where] = segment.labels[rows]
        return data, scale, low, logits, labels
