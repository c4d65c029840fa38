"""``cloud-runtime serve``: FedGKT's cloud side over a broker.

Keeps a device registry (registration, retained online/offline status, heartbeats), runs rounds
(sync: a retained round announcement, deadline and quorum; async: each device runs at its own pace
and the server trains on whatever has arrived, staleness-bounded), trains the server model with
:class:`GKTServer`, answers each device with its soft labels, evaluates, checkpoints every round and
resumes from the checkpoint on restart. Every rejected message is logged with its reason and counted.

Network callbacks only enqueue; decoding, training and publishing happen on the main thread.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import queue
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from cloud_runtime.config import RuntimeConfig, load_runtime_config
from cloud_runtime.server_trainer import GKTServer
from edge_sdk import protocol as P
from edgefl_core.config import ConfigError
from edge_sdk.messages import FeatureUpload, MessageError
from edgefl_core.data.datasets import dataset_stats
from edgefl_core.transport import Transport, create_transport
from model_zoo import create_model
from tools.report import plot_accuracy, write_json

logger = logging.getLogger("edgefl.runtime")

SERVER_CHECKPOINT = "server.pt"
GLOBAL_CHECKPOINT = "global_model.pt"
RUNTIME_STATE = "runtime.json"


class Rejected(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


class CloudRuntime:
    def __init__(self, cfg: RuntimeConfig, transport: Transport):
        self.cfg = cfg
        self.transport = transport
        self.topics = P.Topics(cfg.run_id)
        self.inbox: queue.Queue = queue.Queue()
        self.reassembler = P.Reassembler(cfg.max_transfer_bytes, cfg.transfer_timeout_s,
                                         max_chunk=cfg.max_chunk_bytes)
        self.state_dir = Path(cfg.state_dir)
        self.session = uuid.uuid4().hex[:12]  # changes on every (re)start: devices re-send lost uploads
        self.stop = threading.Event()
        self.server: GKTServer | None = None
        self.num_classes: int | None = None
        self.feature_channels: int | None = None
        self.devices: dict[str, dict] = {}
        self.rejections: Counter = Counter()
        self.reject_streak: Counter = Counter()           # consecutive rejections per device
        self.sample_owner: dict[str, dict[int, str]] = {"train": {}, "test": {}}  # split -> id -> device
        self.device_ids: dict[str, dict[str, np.ndarray]] = {}  # device -> split -> its pinned sample ids
        self.checkpoint_generation = 0
        self._checkpoint_files: dict[str, str] = {}  # what runtime.json names (restore loads exactly those)
        self.messages_in = 0
        self.rows: list[dict] = []
        self.next_round = 0
        self.train_uploads: dict[str, FeatureUpload] = {}
        self.test_uploads: dict[str, FeatureUpload] = {}
        self.round_bytes: Counter = Counter()
        self.round_raw: Counter = Counter()
        # async bookkeeping
        self.server_version = 0
        self.arrival_version: dict[str, int] = {}
        self.device_round: dict[str, int] = {}
        self.awaiting_labels: set[str] = set()
        self.extractors: dict[str, tuple[dict, int]] = {}  # fedgkt.average_extractors: latest per device
        # fedavg bookkeeping
        self.global_model: torch.nn.Module | None = None
        self.model_updates: dict[str, tuple[dict, int, dict]] = {}
        self._eval_set = None
        self.started = time.time()
        self._cost_cache: dict = {}

    # -- inbox ------------------------------------------------------------------------------------

    def _enqueue(self, topic: str, payload: bytes) -> None:
        self.inbox.put((topic, payload))

    def start(self) -> None:
        for topic_filter in (self.topics.all_up, self.topics.all_status, self.topics.all_heartbeat):
            self.transport.subscribe(topic_filter, self._enqueue)
        self.transport.connect()
        if self.next_round < self.cfg.rounds:  # devices that registered before we listened do so again
            self.transport.publish(self.topics.control, P.control_frame(
                P.HELLO, run=self.cfg.run_id, device="*", round_=self.next_round, session=self.session), retain=True)
        logger.info("runtime (session %s, %s mode) serving run %r", self.session, self.cfg.mode, self.cfg.run_id)

    def pump(self, timeout: float = 0.2) -> None:
        """Handle everything queued (waiting up to ``timeout`` for the first message)."""
        try:
            item = self.inbox.get(timeout=timeout)
        except queue.Empty:
            item = None
        while item is not None:
            self.handle(*item)
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                item = None
        for device, transfer in self.reassembler.expire():
            self._reject("transfer_timeout", device, f"transfer {transfer[:8]} incomplete after "
                                                     f"{self.cfg.transfer_timeout_s:.0f}s")

    def _reject(self, reason: str, device: str | None, detail: str) -> None:
        """Count and log a rejection with its reason; quarantine a device that keeps sending bad data."""
        self.rejections[reason] += 1
        logger.warning("rejected message from %s: %s: %s", device or "?", reason, detail)
        info = self.devices.get(device) if device else None
        if info is None:
            return
        info["rejected"] = info.get("rejected", 0) + 1
        reasons = info.setdefault("rejection_reasons", {})
        reasons[reason] = reasons.get(reason, 0) + 1
        info["last_rejection"] = {"reason": reason, "detail": detail[:300], "time": time.time()}
        if reason == "quarantined":
            return
        self.reject_streak[device] += 1
        v = self.cfg.validation
        if self.reject_streak[device] >= v.quarantine_after and not self._quarantined(device):
            info["quarantined_until"] = time.time() + v.quarantine_s
            info["quarantines"] = info.get("quarantines", 0) + 1
            self.reject_streak[device] = 0
            logger.error("%s quarantined for %.0fs after %d consecutive rejected messages (last: %s)", device,
                         v.quarantine_s, v.quarantine_after, reason)

    def _quarantined(self, device: str) -> bool:
        until = self.devices.get(device, {}).get("quarantined_until")
        if until is None:
            return False
        if time.time() < until:
            return True
        self.devices[device].pop("quarantined_until", None)
        logger.warning("%s released from quarantine", device)
        return False

    def handle(self, topic: str, payload: bytes) -> None:
        self.messages_in += 1
        topic_device = self.topics.device_of(topic)
        try:
            header, body = P.decode_frame(payload, max_body=self.cfg.max_chunk_bytes)
        except P.ProtocolError as e:
            self._reject(e.reason, topic_device, str(e))
            return
        device = header["device"]
        try:
            if header["run"] != self.cfg.run_id:
                raise Rejected("wrong_run", f"run {header['run']!r}")
            if topic_device is None or device != topic_device:
                raise Rejected("spoofed_device", f"{device!r} published on {topic}")
            if self._quarantined(device) and not topic.endswith("/status"):
                raise Rejected("quarantined", f"ignored until {time.ctime(self.devices[device]['quarantined_until'])}")
            kind = header["type"]
            if topic.endswith("/status"):
                self._on_status(device, header)
            elif topic.endswith("/hb"):
                self._on_heartbeat(device, header)
            elif kind == P.REGISTER:
                self._on_register(device, header)
            elif kind == P.CHUNK:
                self._on_chunk(device, header, body, len(payload))
            else:
                raise Rejected("bad_type", f"unexpected {kind!r} on {topic}")
        except Rejected as e:
            self._reject(e.reason, device, str(e).split(": ", 1)[-1])
        except P.ProtocolError as e:
            self._reject(e.reason, device, str(e))
        except MessageError as e:
            self._reject("bad_payload", device, str(e))
        except Exception as e:  # a handler bug must cost one message, never the service (the fuzz test hunts these)
            logger.exception("internal error handling a message from %s on %s", device, topic)
            self._reject("internal_error", device, f"{type(e).__name__}: {e}")

    def _on_status(self, device: str, header: dict) -> None:
        online = bool(header.get("data", {}).get("online"))
        if device in self.devices:
            info = self.devices[device]
            info["online"] = online
            if online:
                info.pop("offline_since", None)
            else:
                info["offline_since"] = time.time()
            logger.info("%s is %s", device, "online" if online else "offline")

    def _on_heartbeat(self, device: str, header: dict) -> None:
        if device not in self.devices:
            raise Rejected("unknown_device", "heartbeat before registration")
        info = self.devices[device]
        info["online"] = True
        info["last_heartbeat"] = time.time()
        info["heartbeat"] = {k: v for k, v in header.get("data", {}).items()
                             if isinstance(v, (int, float, str, type(None)))}

    def _on_register(self, device: str, header: dict) -> None:
        data = header.get("data", {})
        num_classes, channels = data.get("num_classes"), data.get("feature_channels")
        if not isinstance(num_classes, int) or not isinstance(channels, int) or num_classes < 2 or channels < 1:
            raise Rejected("bad_registration", f"num_classes {num_classes!r}, feature_channels {channels!r}")
        if self.num_classes is None:
            self.num_classes, self.feature_channels = num_classes, channels
            if self.cfg.algorithm == "fedavg":
                self._build_global(data)
            else:
                self._build_server()
        elif (num_classes, channels) != (self.num_classes, self.feature_channels):
            raise Rejected("bad_registration", f"{num_classes} classes / {channels} feature channels, the run has "
                                               f"{self.num_classes} / {self.feature_channels}")
        known = device in self.devices
        info = self.devices.setdefault(device, {"bytes_up": 0, "bytes_down": 0, "raw_fp32_bytes": 0, "rounds": [],
                                                "rejected": 0})
        info.pop("offline_since", None)
        info.update(online=True, registered_at=time.time(), **{k: data.get(k) for k in (
            "profile", "model", "trainer", "train_samples", "test_samples", "codec", "pid", "batch_size", "epochs",
            "input_shape", "model_kwargs", "optimizer")})
        logger.info("%s %sregistered: %s samples, model %s, trainer %s, profile %s", device, "re-" if known else "",
                    data.get("train_samples"), data.get("model"), data.get("trainer"), data.get("profile"))
        if self.cfg.mode == "async" and device in self.device_round and device not in self.awaiting_labels:
            self._send_round(device, self.device_round[device])  # a restarted device picks up where it was

    def _on_chunk(self, device: str, header: dict, body: bytes, wire: int) -> None:
        if device not in self.devices:
            raise Rejected("unknown_device", "upload before registration")
        self.round_bytes[device] += wire
        self.devices[device]["bytes_up"] += wire
        done = self.reassembler.add(header, body, wire)
        if done is None:
            return
        kind = done.meta.get("kind")
        if kind not in ((P.KIND_MODEL_UPDATE,) if self.cfg.algorithm == "fedavg" else (P.KIND_UPLOAD,)):
            raise Rejected("bad_type", f"transfer kind {kind!r} on an uplink of a {self.cfg.algorithm} run")
        expected = self._expected_round(device)
        if done.round != expected:
            raise Rejected("stale_round" if done.round < expected else "future_round",
                           f"upload for round {done.round}, expected {expected}")
        if kind == P.KIND_MODEL_UPDATE:
            self._accept_model_update(device, done)
            return
        arrays = P.unpack_arrays(done.blob, self.cfg.max_transfer_bytes)
        upload = P.arrays_to_upload(arrays, done.meta, device, done.round)
        extractor = {k[len(P.EXTRACTOR_PREFIX):]: v for k, v in arrays.items() if k.startswith(P.EXTRACTOR_PREFIX)}
        if extractor and upload.split == "train":
            reference = next(iter(self.extractors.values()))[0] if self.extractors else None
            self.extractors[device] = (P.arrays_to_state(extractor, reference), len(upload.sample_ids))
        try:
            upload.validate(self.num_classes, self.server.feature_shape if self.server else None)
        except MessageError as e:
            raise Rejected("non_finite" if "NaN" in str(e) else "bad_shape", str(e)) from None
        self._check_plausible(upload)
        self._check_ownership(device, upload)
        if upload.split == "train" and self.server is not None and self.server.feature_shape is None:
            self.server.feature_shape = tuple(upload.features.shape[1:])
        store = self.train_uploads if upload.split == "train" else self.test_uploads
        replaced = device in store and store[device].round == upload.round
        store[device] = upload  # keyed by device: a re-sent transfer replaces, never double-counts
        self.round_raw[device] += int(done.meta.get("raw_fp32_bytes", 0)) if not replaced else 0
        self.devices[device]["raw_fp32_bytes"] += int(done.meta.get("raw_fp32_bytes", 0)) if not replaced else 0
        if upload.split == "train":
            self.arrival_version[device] = self.server_version
            self.devices[device]["last_metrics"] = upload.metrics
        self.reject_streak[device] = 0
        self.transport.publish(self.topics.down(device), P.control_frame(
            P.ACK, run=self.cfg.run_id, device=device, round_=done.round, transfer=done.transfer, accepted=True))
        logger.info("%s: %s upload of round %d accepted: %d samples, %.2f MB (%d chunks)%s", device, upload.split,
                    done.round, len(upload.sample_ids), done.wire_bytes / 1e6, done.chunks,
                    " (replaces a resend)" if replaced else "")

    def _check_plausible(self, upload: FeatureUpload) -> None:
        v = self.cfg.validation
        for name, tensor, bound in (("features", upload.features, v.max_abs_feature),
                                    ("logits", upload.logits, v.max_abs_logit)):
            peak = float(tensor.abs().max()) if tensor.numel() else 0.0
            if peak > bound:
                raise Rejected("implausible_values", f"{upload.split} {name}: max |value| {peak:.3g} > {bound:g}")

    def _check_ownership(self, device: str, upload: FeatureUpload) -> None:
        """Sample ids are the device's own: disjoint from every other device's, and the same set each round."""
        ids = upload.sample_ids
        declared = self.devices[device].get(f"{upload.split}_samples")
        if isinstance(declared, int) and len(ids) != declared:
            raise Rejected("sample_ids", f"{len(ids)} {upload.split} samples, the device registered {declared}")
        pinned = self.device_ids.get(device, {}).get(upload.split)
        if pinned is not None:
            if len(pinned) != len(ids) or not np.array_equal(np.sort(ids), pinned):
                raise Rejected("sample_ids", f"{upload.split} sample ids differ from the {len(pinned)} this device "
                                             "uploaded before")
            return
        owners = self.sample_owner[upload.split]
        stolen = [int(i) for i in ids if owners.get(int(i), device) != device]
        if stolen:
            raise Rejected("sample_ids", f"{len(stolen)} {upload.split} sample ids belong to other devices "
                                         f"(e.g. {stolen[0]} is {owners[stolen[0]]}'s)")
        for i in ids.tolist():
            owners[i] = device
        self.device_ids.setdefault(device, {})[upload.split] = np.sort(ids)

    def _expected_round(self, device: str) -> int:
        if self.cfg.mode == "async":
            return self.device_round.get(device, -1)
        return self.next_round

    # -- fedavg -----------------------------------------------------------------------------------

    def _build_global(self, registration: dict) -> None:
        shape = registration.get("input_shape") or [3, 32, 32]
        torch.manual_seed(self.cfg.seed)  # every restart rebuilds the same initial model
        self.global_model = create_model(registration.get("model") or "resnet56", num_classes=self.num_classes,
                                         in_channels=int(shape[0]), **(registration.get("model_kwargs") or {}))
        name = self._checkpoint_files.get("global_checkpoint")
        checkpoint = self.state_dir / name if name else None
        if checkpoint is not None and checkpoint.exists():
            self.global_model.load_state_dict(torch.load(checkpoint, weights_only=True, map_location="cpu"))
            logger.info("global model restored from %s", checkpoint)
        logger.info("global model %s: %d parameters", registration.get("model"),
                    sum(p.numel() for p in self.global_model.parameters()))

    def _accept_model_update(self, device: str, done: P.CompletedTransfer) -> None:
        assert self.global_model is not None
        reference = self.global_model.state_dict()
        state = P.arrays_to_state(P.unpack_arrays(done.blob, self.cfg.max_transfer_bytes), reference)
        samples = done.meta.get("samples")
        if not isinstance(samples, int) or samples <= 0:
            raise Rejected("bad_payload", f"model update with samples={samples!r}")
        for name, tensor in state.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                raise Rejected("non_finite", f"model update: {name} contains NaN or Inf")
        from cloud_runtime.aggregation import update_norm
        floats = [k for k, v in state.items() if v.is_floating_point()]
        norm = update_norm({k: state[k].numpy() for k in floats}, {k: reference[k].numpy() for k in floats})
        if norm > self.cfg.validation.max_update_norm:
            raise Rejected("implausible_values", f"model update norm {norm:.3g} > {self.cfg.validation.max_update_norm:g}")
        replaced = device in self.model_updates
        self.model_updates[device] = (state, samples, dict(done.meta.get("metrics") or {}))
        raw = int(done.meta.get("raw_fp32_bytes", 0))
        self.round_raw[device] += raw if not replaced else 0
        self.devices[device]["raw_fp32_bytes"] += raw if not replaced else 0
        self.reject_streak[device] = 0
        self.transport.publish(self.topics.down(device), P.control_frame(
            P.ACK, run=self.cfg.run_id, device=device, round_=done.round, transfer=done.transfer, accepted=True))
        logger.info("%s: model update of round %d accepted: %d samples, %.2f MB", device, done.round, samples,
                    done.wire_bytes / 1e6)

    def _broadcast_global(self, round_: int, devices: list[str]) -> None:
        assert self.global_model is not None
        arrays, meta = P.state_to_arrays(self.global_model.state_dict(), self.cfg.fedavg.model_codec)
        meta["kind"] = P.KIND_MODEL
        blob = P.pack_arrays(arrays)
        for device in devices:
            self._send_transfer(device, blob, round_, meta)

    def _aggregate(self) -> dict:
        """Robust aggregation of this round's updates into the global model; returns the row's diagnostics."""
        from cloud_runtime import aggregation as A
        assert self.global_model is not None
        devices = sorted(self.model_updates)
        reference = {k: v.numpy() for k, v in self.global_model.state_dict().items()}
        states = [{k: v.numpy() for k, v in self.model_updates[d][0].items()} for d in devices]
        weights = [self.model_updates[d][1] for d in devices]
        floats = [k for k, v in reference.items() if np.issubdtype(v.dtype, np.floating)]
        norms = [A.update_norm({k: s[k] for k in floats}, {k: reference[k] for k in floats}) for s in states]
        fa = self.cfg.fedavg
        if fa.clip_multiplier is not None and len(states) > 1:
            bound = fa.clip_multiplier * float(np.median(norms))
            states = [{**s, **A.clip_update({k: s[k] for k in floats}, {k: reference[k] for k in floats}, bound)}
                      for s in states]
        else:
            bound = None
        if fa.aggregator == "median":
            new = A.coordinate_median(states)
        elif fa.aggregator == "trimmed_mean":
            new = A.trimmed_mean(states, fa.trim_fraction)
        else:
            new = A.fedavg(states, weights)
        divergence = A.layer_divergence([{k: s[k] for k in floats} for s in states], {k: new[k] for k in floats})
        self.global_model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in new.items()})
        return {"update_norms": dict(zip(devices, norms)), "clip_bound": bound,
                "clipped": [d for d, n in zip(devices, norms) if bound is not None and n > bound],
                "divergence": divergence, "weights": dict(zip(devices, weights))}

    @torch.inference_mode()
    def _evaluate_global(self, row: dict) -> None:
        if self.cfg.eval_data is None or self.global_model is None:
            row["test_accuracy"] = None
            return
        from edge_sdk.data.batching import ArrayLoader
        if self._eval_set is None:
            from edgefl_core.data.local import load_local_data
            _, self._eval_set = load_local_data(self.cfg.eval_data)
        stats = self.cfg.eval_data.dataset if dataset_stats(self.cfg.eval_data.dataset) else None
        model = self.global_model.eval()
        correct = loss = 0.0
        for batch in ArrayLoader(self._eval_set, 500, stats_name=stats, channels_last=False):
            logits = model(batch.images)
            correct += int((logits.argmax(1) == batch.labels).sum())
            loss += float(torch.nn.functional.cross_entropy(logits, batch.labels, reduction="sum"))
        n = len(self._eval_set)
        row.update(test_accuracy=correct / n, test_loss=loss / n, test_samples=n)

    def run_fedavg(self) -> None:
        for round_ in range(self.next_round, self.cfg.rounds):
            if self.stop.is_set():
                return
            self.model_updates.clear()
            self.round_bytes.clear()
            self.round_raw.clear()
            start = time.monotonic()
            self._announce_round(round_, False, [])
            self._broadcast_global(round_, self._registered())
            logger.info("round %d open: global model sent to %d devices", round_, len(self.devices))
            if not self._collect(round_, lambda: set(self.model_updates)):
                return
            row: dict = {"round": round_, "participants": sorted(self.model_updates),
                         "upload_seconds": time.monotonic() - start, **self._aggregate()}
            self._evaluate_global(row)
            row["edge"] = {d: self.model_updates[d][2] for d in row["participants"]}
            row["accepted_samples"] = {d: self.model_updates[d][1] for d in row["participants"]}
            self._finish_row(row, start)
            self.next_round = round_ + 1
            self.checkpoint()

    # -- server -----------------------------------------------------------------------------------

    def _build_server(self) -> None:
        model = create_model(self.cfg.server.model, num_classes=self.num_classes,
                             feature_channels=self.feature_channels, **self.cfg.server.model_kwargs)
        self.server = GKTServer(model, self.cfg.server, self.num_classes, seed=self.cfg.seed)
        name = self._checkpoint_files.get("server_checkpoint")
        checkpoint = self.state_dir / name if name else None
        if checkpoint is not None and checkpoint.exists():
            state = torch.load(checkpoint, weights_only=True, map_location="cpu")  # no pickle execution
            self.server.load_state_dict(state)
            logger.info("server model restored from %s", checkpoint)

    def _send_transfer(self, device: str, blob: bytes, round_: int, meta: dict) -> None:
        """Chunk a packed transfer onto one device's downlink and count its bytes."""
        frames = P.chunk_transfer(blob, run=self.cfg.run_id, device=device, round_=round_, meta=meta)
        for frame in frames:
            self.transport.publish(self.topics.down(device), frame)
        wire = sum(map(len, frames))
        self.devices[device]["bytes_down"] += wire
        self.round_bytes[f"down:{device}"] += wire

    def _send_soft_labels(self, replies) -> None:
        for device, message in replies.items():
            arrays, meta = P.soft_labels_to_arrays(message)
            self._send_transfer(device, P.pack_arrays(arrays), message.round, meta)

    def _average_extractors(self, round_: int, devices: list[str]) -> None:
        """FedAvg of the devices' extractors (async: staleness-discounted), sent back before the soft labels."""
        from cloud_runtime.aggregation import average_torch_states, staleness_weights
        names = [d for d in sorted(self.extractors) if d in devices]
        if not names:
            return
        weights = [self.extractors[d][1] for d in names]
        if self.cfg.mode == "async":
            stale = [self.server_version - self.arrival_version.get(d, self.server_version) for d in names]
            weights = [w * s for w, s in zip(weights, staleness_weights(stale))]
        average = average_torch_states([self.extractors[d][0] for d in names], weights)
        arrays, meta = P.state_to_arrays(average, "fp32")
        meta["kind"] = P.KIND_EXTRACTOR
        blob = P.pack_arrays(arrays)
        for device in devices:
            self._send_transfer(device, blob, round_, meta)
        logger.info("round %d: extractors of %d devices averaged", round_, len(names))

    def _train_and_answer(self, round_: int, devices: list[str]) -> dict:
        assert self.server is not None
        for device in devices:
            self.server.ingest(self.train_uploads[device])
        if self.cfg.mode == "sync":  # a device that stopped uploading: its features age out
            for device, stored in list(self.server.train_store.items()):
                if round_ - stored.round > self.cfg.max_staleness:
                    self.server.drop_device(device)
                    logger.info("%s: features of round %d dropped from server training (stale)", device, stored.round)
        replies, stats = self.server.train_round(round_)
        replies = {d: m for d, m in replies.items() if d in devices}
        if self.cfg.fedgkt.average_extractors:
            self._average_extractors(round_, devices)
        self._send_soft_labels(replies)
        logger.info("round %d server: loss %.3f acc %.3f on %d samples from %d devices at %.0f/s", round_, stats.loss,
                    stats.train_accuracy, stats.samples, len(devices), stats.samples_per_s)
        return asdict(stats)

    def _evaluate(self, row: dict) -> None:
        if not self.test_uploads or self.server is None:
            row["test_accuracy"] = None
            return
        result = self.server.evaluate(list(self.test_uploads.values()))
        row.update(test_accuracy=result.accuracy, test_loss=result.loss, test_samples=result.samples,
                   mean_device_accuracy=result.mean_device_accuracy, per_device=result.per_device)

    # -- rounds: sync -----------------------------------------------------------------------------

    def _registered(self) -> list[str]:
        return sorted(self.devices)

    def _reachable(self) -> list[str]:
        """Devices a round still waits for: online, or offline for less than ``offline_grace_s`` (a restart)."""
        now = time.time()
        return [d for d in self._registered() if self.devices[d].get("online")
                or now - self.devices[d].get("offline_since", 0.0) < self.cfg.offline_grace_s]

    def wait_for_devices(self) -> None:
        start = time.monotonic()
        want = self.cfg.expected_devices
        while not self.stop.is_set():
            self.pump()
            n = len(self.devices)
            elapsed = time.monotonic() - start
            if (want is not None and n >= want) or (n >= self.cfg.min_devices and elapsed >= self.cfg.registration_timeout_s):
                logger.info("%d devices registered: %s", n, ", ".join(self._registered()))
                return
            if elapsed >= self.cfg.registration_timeout_s and int(elapsed) % 30 == 0:
                logger.warning("waiting for devices: %d registered, need %d", n, self.cfg.min_devices)

    def _announce_round(self, round_: int, eval_: bool, previous: list[str]) -> None:
        frame = P.control_frame(P.ROUND, run=self.cfg.run_id, device="*", round_=round_, session=self.session,
                                eval=eval_, deadline_s=self.cfg.round_deadline_s,
                                soft_labels_round=round_ - 1 if previous else None, soft_labels_to=previous,
                                soft_labels_wait_s=self.cfg.soft_labels_wait_s,
                                average_extractors=self.cfg.fedgkt.average_extractors)
        self.transport.publish(self.topics.control, frame, retain=True)

    def run_sync(self) -> None:
        previous: list[str] = list(self.rows[-1].get("participants", [])) if self.rows else []
        for round_ in range(self.next_round, self.cfg.rounds):
            if self.stop.is_set():
                return
            eval_ = (round_ + 1) % self.cfg.eval_every == 0 or round_ == self.cfg.rounds - 1
            self.train_uploads.clear()
            self.test_uploads.clear()
            self.round_bytes.clear()
            self.round_raw.clear()
            start = time.monotonic()
            self._announce_round(round_, eval_, previous)
            logger.info("round %d open (deadline %.0fs, eval %s)", round_, self.cfg.round_deadline_s, eval_)
            done = (lambda: set(self.train_uploads) & set(self.test_uploads)) if eval_ else (lambda: set(self.train_uploads))
            if not self._collect(round_, done):
                return
            participants = sorted(self.train_uploads)
            upload_seconds = time.monotonic() - start
            row: dict = {"round": round_, "participants": participants, "upload_seconds": upload_seconds,
                         "server": self._train_and_answer(round_, participants)}
            if eval_:
                self._evaluate(row)
            else:
                row["test_accuracy"] = None
            self._finish_row(row, start)
            previous = participants
            self.next_round = round_ + 1
            self.checkpoint()

    def _collect(self, round_: int, done) -> bool:
        """Serve until every reachable device is ``done()``, or the deadline passes with a quorum of them.

        Returns False when asked to stop."""
        start, warned = time.monotonic(), False
        while not self.stop.is_set():
            self.pump()
            finished = done()
            waiting_for = self._reachable()
            if waiting_for and all(d in finished for d in waiting_for):
                return True
            need = max(1, math.ceil(self.cfg.quorum * len(self.devices)))
            if time.monotonic() - start >= self.cfg.round_deadline_s:
                if len(finished) >= need:
                    missing = sorted(set(self._registered()) - finished)
                    logger.warning("round %d deadline: closing with %d/%d devices (missing %s)", round_,
                                   len(finished), len(self.devices), ", ".join(missing))
                    return True
                if not warned:
                    logger.warning("round %d deadline passed with %d uploads, quorum needs %d: waiting", round_,
                                   len(finished), need)
                    warned = True
        return False

    def _finish_row(self, row: dict, start: float) -> None:
        up = {d: b for d, b in self.round_bytes.items() if not d.startswith("down:")}
        raw = sum(self.round_raw.values())
        row.update(seconds=time.monotonic() - start, bytes_up=up,
                   bytes_down={d[5:]: b for d, b in self.round_bytes.items() if d.startswith("down:")},
                   upload_compression_ratio=raw / max(sum(up.values()), 1), rejections=dict(self.rejections))
        if "edge" not in row:
            row["edge"] = {d: dict(self.train_uploads[d].metrics) for d in row["participants"]}
        if "accepted_samples" not in row:  # what this round trained on: the invariant the fault drills check
            row["accepted_samples"] = {d: int(len(self.train_uploads[d].sample_ids)) for d in row["participants"]
                                       if d in self.train_uploads}
        self.rows.append(row)
        acc = row.get("test_accuracy")
        logger.info("round %d done in %.1fs: %s, upload %.1f MB (%.1fx smaller than fp32)", row["round"], row["seconds"],
                    f"test accuracy {acc:.4f}" if acc is not None else "no eval", sum(up.values()) / 1e6,
                    row["upload_compression_ratio"])

    # -- rounds: async ----------------------------------------------------------------------------

    def _send_round(self, device: str, round_: int) -> None:
        eval_ = True
        self.transport.publish(self.topics.down(device), P.control_frame(
            P.ROUND, run=self.cfg.run_id, device=device, round_=round_, session=self.session, eval=eval_,
            deadline_s=self.cfg.round_deadline_s, soft_labels_round=round_ - 1 if round_ > 0 else None,
            soft_labels_to=[device] if round_ > 0 else [], soft_labels_wait_s=self.cfg.soft_labels_wait_s,
            average_extractors=self.cfg.fedgkt.average_extractors))

    def run_async(self) -> None:
        """Devices run at their own pace; each server update trains on what has arrived (staleness-bounded)."""
        for device in self._registered():
            if device not in self.device_round:
                self.device_round[device] = 0
                self._send_round(device, 0)
        last_update = time.monotonic()
        while self.server_version < self.cfg.rounds and not self.stop.is_set():
            self.pump()
            for device in self._registered():  # late registrants join at round 0
                if device not in self.device_round:
                    self.device_round[device] = 0
                    self._send_round(device, 0)
            fresh = [d for d, up in self.train_uploads.items()
                     if up.round == self.device_round.get(d) and d not in self.awaiting_labels]
            if not fresh:
                continue
            for device in list(self.train_uploads):  # staleness bound
                if self.server_version - self.arrival_version.get(device, 0) > self.cfg.max_staleness:
                    del self.train_uploads[device]
                    if self.server is not None:
                        self.server.drop_device(device)
            start = time.monotonic()
            included = sorted(self.train_uploads)
            version = self.server_version
            row: dict = {"round": version, "participants": included, "fresh": sorted(fresh),
                         "device_rounds": {d: self.train_uploads[d].round for d in included},
                         "staleness": {d: version - self.arrival_version.get(d, version) for d in included},
                         "since_last_update": start - last_update,
                         "server": self._train_and_answer(version, included)}
            self.server_version += 1
            for device in fresh:  # these devices got soft labels for their round: start their next one
                self.device_round[device] += 1
                self._send_round(device, self.device_round[device])
            if (version + 1) % self.cfg.eval_every == 0 or self.server_version == self.cfg.rounds:
                self._evaluate(row)
            else:
                row["test_accuracy"] = None
            row["participants"] = included
            self._finish_row(row, start)
            self.round_bytes.clear()
            self.round_raw.clear()
            last_update = time.monotonic()
            self.next_round = self.server_version
            self.checkpoint()

    # -- state and report -------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Model files first (new names), then runtime.json naming them: runtime.json is the commit point,
        so a crash anywhere leaves a consistent (model, round) pair and nothing is trained on twice."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        generation = self.checkpoint_generation + 1
        files = {}
        for key, module, stem in (("server_checkpoint", self.server, SERVER_CHECKPOINT),
                                  ("global_checkpoint", self.global_model, GLOBAL_CHECKPOINT)):
            if module is None:
                continue
            name = stem.replace(".pt", f".{generation}.pt")
            tmp = self.state_dir / (name + ".tmp")
            torch.save(module.state_dict(), tmp)  # tensors and plain containers only: loads with weights_only
            os.replace(tmp, self.state_dir / name)
            files[key] = name
        write_json(self.state_dir / RUNTIME_STATE, {
            "generation": generation, **files,
            "next_round": self.next_round, "rows": self.rows, "devices": self.devices,
            "rejections": dict(self.rejections), "num_classes": self.num_classes,
            "feature_channels": self.feature_channels, "device_round": self.device_round,
            "server_version": self.server_version,
            "device_ids": {d: {split: ids.tolist() for split, ids in by_split.items()}
                           for d, by_split in self.device_ids.items()}})
        self.checkpoint_generation = generation
        for stale in self.state_dir.glob("*.pt"):
            if stale.name not in files.values():
                stale.unlink(missing_ok=True)
        self.write_report()

    def restore(self) -> bool:
        path = self.state_dir / RUNTIME_STATE
        if not path.exists():
            return False
        state = json.loads(path.read_text())
        self.next_round = int(state["next_round"])
        self.rows = state["rows"]
        self.devices = state["devices"]
        for info in self.devices.values():
            info["online"] = False  # until they say otherwise
        self.rejections = Counter(state.get("rejections", {}))
        self.device_round = {k: int(v) for k, v in state.get("device_round", {}).items()}
        self.server_version = int(state.get("server_version", 0))
        self.checkpoint_generation = int(state.get("generation", 0))
        self._checkpoint_files = {k: state[k] for k in ("server_checkpoint", "global_checkpoint") if k in state}
        for device, by_split in state.get("device_ids", {}).items():
            for split, ids in by_split.items():
                self.device_ids.setdefault(device, {})[split] = np.asarray(ids, dtype=np.int64)
                self.sample_owner[split].update((int(i), device) for i in ids)
        if state.get("num_classes"):
            self.num_classes, self.feature_channels = state["num_classes"], state["feature_channels"]
            if self.cfg.algorithm == "fedavg":
                first = next(iter(self.devices.values()), {})
                self._build_global(first)
            else:
                self._build_server()
        logger.info("resumed from %s at round %d", path, self.next_round)
        return True

    def _device_cost(self, device: str, info: dict) -> dict | None:
        """Predicted vs measured step time, FLOPs spent and bytes moved for one device."""
        from device_profiles.cost_report import device_cost
        rounds_done = sum(device in r.get("participants", []) for r in self.rows)
        try:
            return device_cost(info, rounds_done, self._cost_cache)
        except Exception as e:  # a profile we cannot evaluate must not break the report
            logger.warning("no cost estimate for %s: %s", device, e)
            return None

    def report(self) -> dict:
        evaluated = [r for r in self.rows if r.get("test_accuracy") is not None]
        up = sum(d["bytes_up"] for d in self.devices.values())
        raw = sum(d["raw_fp32_bytes"] for d in self.devices.values())
        final = {}
        if evaluated:
            last = evaluated[-1]
            final = {"test_accuracy": last["test_accuracy"], "mean_device_accuracy": last.get("mean_device_accuracy"),
                     "best_test_accuracy": max(r["test_accuracy"] for r in evaluated),
                     "test_samples": last.get("test_samples")}
        final.update(rounds=len(self.rows), bytes_up=up, bytes_down=sum(d["bytes_down"] for d in self.devices.values()),
                     upload_compression_ratio=raw / max(up, 1), rejections=dict(self.rejections),
                     messages_in=self.messages_in,
                     accepted_samples=sum(sum(r.get("accepted_samples", {}).values()) for r in self.rows),
                     quarantined=sorted(d for d, info in self.devices.items() if info.get("quarantines")),
                     total_seconds=time.time() - self.started)
        devices = {}
        for name, info in self.devices.items():
            devices[name] = {k: v for k, v in info.items() if k != "rounds"}
            devices[name]["cost"] = self._device_cost(name, info)
            last = (evaluated[-1].get("per_device") or {}).get(name) if evaluated else None
            if last:
                devices[name].update(final_test_accuracy=last["accuracy"],
                                     final_edge_model_accuracy=last.get("edge_model_accuracy"))
        return {"run": {"name": self.cfg.run_id, "transport": "mqtt", "algorithm": self.cfg.algorithm, "mode": self.cfg.mode,
                        "server_model": self.cfg.server.model, "session": self.session},
                "rounds": self.rows, "final": final, "devices": devices}

    def write_report(self) -> dict:
        report = self.report()
        write_json(self.state_dir / "report.json", report)
        return report

    def finish(self) -> dict:
        self.transport.publish(self.topics.control, P.control_frame(
            P.SHUTDOWN, run=self.cfg.run_id, device="*", round_=self.next_round), retain=True)
        self.transport.flush(30)
        report = self.write_report()
        plot_accuracy(report, self.state_dir / "accuracy.png")
        return report

    def serve(self) -> dict:
        self.restore()
        self.start()
        if self.next_round < self.cfg.rounds:
            self.wait_for_devices()
            if self.cfg.algorithm == "fedavg":
                self.run_fedavg()
            elif self.cfg.mode == "sync":
                self.run_sync()
            else:
                self.run_async()
        if self.stop.is_set():
            logger.info("stopping: state saved at round %d", self.next_round)
            self.checkpoint()
            return self.report()
        report = self.finish()
        if report["final"].get("test_accuracy") is not None:
            logger.info("run finished: test accuracy %.4f, upload %.1f MB (%.1fx smaller than fp32), %d rejected",
                        report["final"]["test_accuracy"], report["final"]["bytes_up"] / 1e6,
                        report["final"]["upload_compression_ratio"], sum(self.rejections.values()))
        return report

    def close(self) -> None:
        self.transport.close()


def build_runtime(cfg: RuntimeConfig, transport: Transport | None = None) -> CloudRuntime:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if transport is None:
        transport = create_transport(cfg.broker, f"edgefl-runtime-{cfg.run_id}")
    return CloudRuntime(cfg, transport)


def main(argv: list[str] | None = None) -> int:
    from tools.cli_logging import setup_logging

    parser = argparse.ArgumentParser(prog="cloud-runtime", description="edgefl cloud runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run FedGKT rounds over the broker")
    serve.add_argument("--config", required=True, help="runtime YAML")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    serve.add_argument("--log-level", default="INFO")
    from cloud_runtime import provision
    provision.add_parser(sub)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    if args.command == "provision":
        try:
            return provision.main(args)
        except ValueError as e:
            logger.error("provision: %s", e)
            return 2
    try:
        cfg = load_runtime_config(args.config, args.overrides)
        runtime = build_runtime(cfg)
        signal.signal(signal.SIGTERM, lambda *_: runtime.stop.set())
        runtime.serve()
    except (ConfigError, ConnectionError) as e:
        logger.error("%s", e)
        return 2
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
