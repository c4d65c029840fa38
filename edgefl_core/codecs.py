"""Tensor codecs and transfer payloads, in numpy: what features, logits and weights look like on the wire.

Feature codecs (``upload.codec``; one registry, :data:`FEATURE_CODECS`): ``fp32``, ``fp16`` and ``int8``
(per-channel affine uint8, ``x ~= q * scale[c] + low[c]``, channel axis 1 of ``N x C x H x W``).
Model codecs (:data:`MODEL_CODECS`): ``fp32`` and ``fp16`` floating tensors, integer buffers as int64.
A transfer's arrays are packed as one safetensors blob compressed with zstd (:func:`pack_arrays`);
nothing is ever unpickled. Adding a codec: one ``@FEATURE_CODECS.register("name")`` class with
``encode``/``decode``. Figures per codec: ``docs/CODECS.md``.
"""
from __future__ import annotations

import json

from dataclasses import dataclass

import numpy as np
import safetensors.numpy
import zstandard

from edgefl_core.registry import Registry
from edgefl_core.wire import DEFAULT_MAX_TRANSFER_BYTES, ProtocolError


class FeatureCodec:
    """Encodes float32 ``N x C x H x W`` features into named arrays and back (float32)."""

    name = "abstract"
    logits_dtype: type = np.float16   # edge logits travel at this precision

    def encode(self, features: np.ndarray) -> dict[str, np.ndarray]:
        raise NotImplementedError

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        """Raises ProtocolError (``bad_payload`` / ``bad_dtype`` / ``bad_shape``) on malformed arrays."""
        raise NotImplementedError

    def checked(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
        """(values, per-channel scale, per-channel offset) as sent, dtypes and shapes checked, nothing decoded
        (float codecs: no scale or offset). Raises ProtocolError as :meth:`decode` does."""
        raise NotImplementedError


FEATURE_CODECS: Registry[type[FeatureCodec]] = Registry("feature codec")


class _FloatCodec(FeatureCodec):
    dtype: type = np.float32

    def encode(self, features: np.ndarray) -> dict[str, np.ndarray]:
        return {"features": features.astype(self.dtype, copy=False)}

    def checked(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, None, None]:
        features = arrays.get("features")
        if features is None or features.dtype != self.dtype:
            raise ProtocolError("bad_dtype", f"{self.name} features must be {np.dtype(self.dtype)}")
        return features, None, None

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        return self.checked(arrays)[0].astype(np.float32, copy=False)


@FEATURE_CODECS.register("fp32")
class Fp32Codec(_FloatCodec):
    name, dtype, logits_dtype = "fp32", np.float32, np.float32


@FEATURE_CODECS.register("fp16")
class Fp16Codec(_FloatCodec):
    name, dtype = "fp16", np.float16


@FEATURE_CODECS.register("int8")
class Int8Codec(FeatureCodec):
    """Per-channel affine uint8 over the batch: 4x smaller than fp32 before zstd (docs/CODECS.md)."""

    name = "int8"
    keys = ("features_q", "features_scale", "features_low")
    BLOCK = 256  # samples quantized at a time

    def encode(self, features: np.ndarray) -> dict[str, np.ndarray]:
        x = features.astype(np.float32, copy=False)
        c = x.shape[1]
        axes = (0,) + tuple(range(2, x.ndim))                          # all but the channel axis
        low = x.min(axis=axes) if x.size else np.zeros(c, np.float32)
        high = x.max(axis=axes) if x.size else np.zeros(c, np.float32)
        scale = np.where(high > low, (high - low) / 255.0, 1.0).astype(np.float32)
        shape = (1, c) + (1,) * (x.ndim - 2)                           # broadcast over N, H, W
        q = np.empty(x.shape, np.uint8)
        for start in range(0, len(x), self.BLOCK):  # in blocks: a small device holds no full-size float temporaries
            block = (x[start:start + self.BLOCK] - low.reshape(shape)) / scale.reshape(shape)
            np.rint(block, out=block)
            q[start:start + self.BLOCK] = np.clip(block, 0, 255, out=block)
        return {"features_q": q, "features_scale": scale, "features_low": low.astype(np.float32)}

    def checked(self, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if any(k not in arrays for k in self.keys):
            raise ProtocolError("bad_payload", "int8 features need features_q, features_scale, features_low")
        q, scale, low = (arrays[k] for k in self.keys)
        if q.dtype != np.uint8 or scale.dtype != np.float32 or low.dtype != np.float32:
            raise ProtocolError("bad_dtype", "features_q must be uint8, features_scale and features_low float32")
        if q.ndim < 2 or scale.shape != (q.shape[1],) or low.shape != (q.shape[1],):
            raise ProtocolError("bad_shape", "int8 features need per-channel scale and low of length C")
        return q, scale, low

    def decode(self, arrays: dict[str, np.ndarray]) -> np.ndarray:
        q, scale, low = self.checked(arrays)
        shape = (1, q.shape[1]) + (1,) * (q.ndim - 2)
        return q.astype(np.float32) * scale.reshape(shape) + low.reshape(shape)


def feature_codec(name: str) -> FeatureCodec:
    """The registered codec ``name``; raises ProtocolError(``bad_codec``) for an unknown one."""
    if name not in FEATURE_CODECS:
        raise ProtocolError("bad_codec", f"unknown codec {name!r}; known: {', '.join(FEATURE_CODECS.names())}")
    return FEATURE_CODECS.get(name)()


def encode_features(features: np.ndarray, codec: str) -> dict[str, np.ndarray]:
    return feature_codec(codec).encode(features)


def decode_features(arrays: dict[str, np.ndarray], codec: str) -> np.ndarray:
    return feature_codec(codec).decode(arrays)


MODEL_CODECS: Registry[type] = Registry("model codec")   # name -> numpy dtype of floating tensors
MODEL_CODECS.register("fp32")(np.float32)
MODEL_CODECS.register("fp16")(np.float16)


def model_codec_dtype(name: str) -> type:
    if name not in MODEL_CODECS:
        raise ProtocolError("bad_codec", f"unknown model codec {name!r}; known: {', '.join(MODEL_CODECS.names())}")
    return MODEL_CODECS.get(name)


# ---------------------------------------------------------------------------------------------
# transfer payloads


def pack_arrays(arrays: dict[str, np.ndarray], level: int = 3) -> bytes:
    """Named arrays -> safetensors -> zstd (level 3)."""
    return zstandard.ZstdCompressor(level=level).compress(safetensors.numpy.save(
        {k: np.ascontiguousarray(v) for k, v in arrays.items()}))


MAX_COMPRESSION_RATIO = 64  # what a blob past 1 MiB may decompress to, times its size: features, logits and
#                             weights compress 1-3x (int8 features about 2x); a zstd bomb compresses 30,000x


def decompress(blob: bytes, max_bytes: int = DEFAULT_MAX_TRANSFER_BYTES) -> bytes:
    """The safetensors bytes of a :func:`pack_arrays` blob. The zstd frame must state its decompressed size
    (RFC 8878 Frame_Content_Size, which :func:`pack_arrays` always writes); a size above ``max_bytes``, or above
    1 MiB and :data:`MAX_COMPRESSION_RATIO` times the blob's, is refused before anything is allocated, and
    decompression never allocates more than the stated size: a 32 KB bomb cannot cost a GiB and a second of
    CPU. Raises ProtocolError ``bad_compression`` / ``oversized``."""
    try:
        size = zstandard.frame_content_size(blob)
    except zstandard.ZstdError as e:
        raise ProtocolError("bad_compression", str(e)) from None
    if size < 0:
        raise ProtocolError("bad_compression", "zstd frame does not state its decompressed size")
    if size > max_bytes:
        raise ProtocolError("oversized", f"transfer decompresses to {size} bytes > limit {max_bytes}")
    if size > max(1 << 20, MAX_COMPRESSION_RATIO * len(blob)):
        raise ProtocolError("bad_compression", f"{len(blob)} bytes state {size} bytes decompressed: more than "
                                               f"{MAX_COMPRESSION_RATIO}x is no upload of features or weights")
    try:
        with zstandard.ZstdDecompressor().stream_reader(blob) as reader:
            _check_safetensors_head(reader, size)
        raw = zstandard.ZstdDecompressor().decompress(blob, max_output_size=size)
    except zstandard.ZstdError as e:
        raise ProtocolError("bad_compression", str(e)) from None
    if len(raw) != size:
        raise ProtocolError("bad_compression", f"decompressed {len(raw)} bytes, the frame states {size}")
    return raw


MAX_SAFETENSORS_HEADER = 1 << 20  # the JSON header of a transfer's safetensors (names, dtypes, shapes, offsets)


def _read_exact(reader, n: int) -> bytes:
    out = b""
    while len(out) < n and (piece := reader.read(n - len(out))):
        out += piece
    return out


def _check_safetensors_head(reader, size: int) -> None:
    """Before a blob is decompressed whole: its first bytes must be a safetensors header (8-byte length, JSON of
    at most :data:`MAX_SAFETENSORS_HEADER`) whose tensors end exactly where the stated size does. A bomb of zeros
    fails here, after a few bytes of decompression instead of a GiB. Raises ProtocolError ``bad_payload``."""
    head = _read_exact(reader, 8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 2 <= length <= min(MAX_SAFETENSORS_HEADER, size - 8):
        raise ProtocolError("bad_payload", f"not a safetensors blob (a header of {length} bytes in {size})")
    try:
        header = json.loads(_read_exact(reader, length))
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as e:
        raise ProtocolError("bad_payload", f"not a safetensors blob (its header: {type(e).__name__})") from None
    if max(ends, default=0) != size - 8 - length:
        raise ProtocolError("bad_payload", f"not a safetensors blob (its tensors end at {max(ends, default=0)}, "
                                           f"the data is {size - 8 - length} bytes)")


def load_arrays(raw: bytes, max_bytes: int = DEFAULT_MAX_TRANSFER_BYTES) -> dict[str, np.ndarray]:
    """Named arrays from safetensors bytes (what :func:`decompress` returns). Raises ProtocolError
    ``oversized`` / ``bad_payload``."""
    if len(raw) > max_bytes:
        raise ProtocolError("oversized", f"transfer of {len(raw)} bytes > limit {max_bytes}")
    try:
        return safetensors.numpy.load(raw)
    except Exception as e:  # safetensors raises its own SafetensorError / ValueError
        raise ProtocolError("bad_payload", f"not a safetensors blob ({e})") from None


def unpack_arrays(blob: bytes, max_bytes: int = DEFAULT_MAX_TRANSFER_BYTES, packed: str = "zstd"
                  ) -> dict[str, np.ndarray]:
    """Inverse of :func:`pack_arrays` (``packed="zstd"``: :func:`decompress`, then :func:`load_arrays`), or of
    safetensors alone (``packed="raw"``: a blob an ingest worker decompressed). Raises ProtocolError
    ``bad_compression`` / ``oversized`` / ``bad_payload``."""
    if packed == "raw":
        return load_arrays(blob, max_bytes)
    return load_arrays(decompress(blob, max_bytes), max_bytes)


@dataclass
class UploadArrays:
    """A feature upload in numpy: ``sample_ids`` N int64, ``features`` N x C x H x W float32,
    ``logits`` N x K float32, ``labels`` N int64, ``split`` "train" | "test"."""

    split: str
    sample_ids: np.ndarray
    features: np.ndarray
    logits: np.ndarray
    labels: np.ndarray
    metrics: dict
    round: int = -1


def encode_upload(up: UploadArrays, codec: str) -> tuple[dict[str, np.ndarray], dict]:
    """Arrays and first-chunk meta of an upload; ``raw_fp32_bytes`` is what fp32 without zstd would cost."""
    c = feature_codec(codec)
    arrays = c.encode(up.features)
    arrays.update(sample_ids=up.sample_ids.astype(np.int64), labels=up.labels.astype(np.int64),
                  logits=up.logits.astype(np.float32, copy=False).astype(c.logits_dtype))
    meta = {"kind": "upload", "split": up.split, "codec": codec, "samples": len(up.sample_ids),
            "feature_shape": list(up.features.shape[1:]), "metrics": up.metrics,
            "raw_fp32_bytes": int(up.features.size * 4 + up.logits.size * 4 + len(up.sample_ids) * 16)}
    return arrays, meta


def decode_upload_meta(arrays: dict[str, np.ndarray], meta: dict) -> tuple[str, str, dict]:
    """(split, codec, metrics) of an upload, its ids, labels and logits dtypes checked (shapes are the
    message's job); raises ProtocolError (``bad_payload`` / ``bad_dtype``)."""
    for key in ("sample_ids", "labels", "logits"):
        if key not in arrays:
            raise ProtocolError("bad_payload", f"upload lacks {key!r}")
    if arrays["sample_ids"].dtype != np.int64 or arrays["labels"].dtype != np.int64:
        raise ProtocolError("bad_dtype", "sample_ids and labels must be int64")
    if arrays["logits"].dtype not in (np.float16, np.float32):
        raise ProtocolError("bad_dtype", f"logits must be float16/32, got {arrays['logits'].dtype}")
    split = meta.get("split")
    if split not in ("train", "test"):
        raise ProtocolError("bad_payload", f"unknown split {split!r}")
    metrics = meta.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise ProtocolError("bad_payload", f"metrics must be an object, got {type(metrics).__name__}")
    return split, str(meta.get("codec")), dict(metrics)


def decode_upload(arrays: dict[str, np.ndarray], meta: dict) -> UploadArrays:
    """Inverse of :func:`encode_upload`, features dequantized to float32 (dtypes and split checked; shapes
    are the message's job)."""
    split, codec, metrics = decode_upload_meta(arrays, meta)
    features = decode_features(arrays, codec)
    return UploadArrays(split, arrays["sample_ids"].copy(), features, arrays["logits"].astype(np.float32),
                        arrays["labels"].copy(), metrics)


def encode_state(state: dict[str, np.ndarray], codec: str = "fp32") -> tuple[dict[str, np.ndarray], dict]:
    """Model weights for the wire: floating arrays in the codec's dtype, integer buffers as int64."""
    dtype = model_codec_dtype(codec)
    arrays, raw = {}, 0
    for name, value in state.items():
        raw += value.size * 4
        arrays[name] = value.astype(dtype) if np.issubdtype(value.dtype, np.floating) else value.astype(np.int64)
    return arrays, {"codec": codec, "tensors": len(arrays), "raw_fp32_bytes": raw}


def decode_state(arrays: dict[str, np.ndarray], shapes: dict[str, tuple[int, ...]] | None = None
                 ) -> dict[str, np.ndarray]:
    """Weights back to float32 / int64; names and shapes must match ``shapes``, values must be finite.
    Raises ProtocolError (``bad_dtype``, ``non_finite``, ``bad_shape``)."""
    state = {}
    for name, value in arrays.items():
        if value.dtype not in (np.float16, np.float32, np.int64):
            raise ProtocolError("bad_dtype", f"{name}: {value.dtype}")
        if value.dtype != np.int64 and not np.all(np.isfinite(value)):
            raise ProtocolError("non_finite", f"{name} contains NaN or Inf")
        state[name] = value.astype(np.float32) if value.dtype == np.float16 else value.copy()
    if shapes is not None:
        if set(state) != set(shapes):
            raise ProtocolError("bad_shape", f"tensor names differ from the model's "
                                             f"(missing {sorted(set(shapes) - set(state))[:3]}, "
                                             f"extra {sorted(set(state) - set(shapes))[:3]})")
        for name, shape in shapes.items():
            if len(shape) == 0 and state[name].size == 1:
                state[name] = state[name].reshape(())  # safetensors stores scalars as shape (1,)
            if tuple(state[name].shape) != tuple(shape):
                raise ProtocolError("bad_shape", f"{name}: {tuple(state[name].shape)}, expected {tuple(shape)}")
    return state
