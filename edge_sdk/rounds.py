"""What a device does with an announced round, and its durable bookkeeping of which rounds are done.

FedGKT (He et al., "Group Knowledge Transfer", NeurIPS 2020, Alg. 1): train the extractor locally (CE + KD
with the server's soft labels of the previous round), then extract and upload the features, logits and
labels of every local sample, one split at a time, each sent until the runtime accepted it. FedAvg (McMahan
et al., 2017): start from the global model, train, send the weights back.

Torch-free: the engine (:class:`~edge_sdk.engine.EdgeEngine`) does the compute; sending goes through the
agent's ``send`` (the uplink, until the runtime's verdict) and persistence through its ``save``.
"""
from __future__ import annotations

import logging
from typing import Callable

from edge_sdk import wire as P
from edge_sdk.config import RunRecipe
from edge_sdk.engine import EdgeEngine, RoundStats
from edge_sdk.privacy import device_key, noise_rng, privatize_features
from edge_sdk.state import RoundProgress

logger = logging.getLogger("edgefl.agent")

# send(blob, round, meta, what, session) -> True once the runtime accepted it (or found it stale)
Send = Callable[[bytes, int, dict, str, "str | None"], bool]


class RoundRunner:
    """Runs announced rounds for ``device``. ``send`` and ``save`` are the agent's (uplink, state file);
    ``state_dir`` holds the device's feature-privacy key."""

    def __init__(self, device: str, send: Send, save: Callable[[], None], progress: RoundProgress | None = None,
                 state_dir: str | None = None):
        self.device, self.send, self.save, self.state_dir = device, send, save, state_dir
        self.progress = progress or RoundProgress()
        self._key: bytes | None = None  # the device's privacy key, read once
        self.global_state: dict | None = None  # FedAvg: the latest global model ...
        self.global_round = -1                 # ... and its round
        self.step_times: list[float] = []      # seconds per training step, one entry per round

    def reset(self) -> None:
        """A new run instance: nothing of the old run's progress counts."""
        self.progress, self.global_state, self.global_round = RoundProgress(), None, -1

    def take(self, engine: EdgeEngine, kind: str, payload, round_: int) -> None:
        """A decoded downlink transfer of round ``round_`` (:func:`edge_sdk.downlink.decode_transfer`): FedAvg's
        global model (kept for the round that starts from it), an averaged extractor (loaded now) or the
        server's soft labels for this device's samples (KD targets of the next local training)."""
        if kind == P.KIND_MODEL:
            self.global_state, self.global_round = payload, max(self.global_round, round_)
            logger.info("%s: global model of round %d", self.device, round_)
        elif kind == P.KIND_EXTRACTOR:
            engine.load_extractor(payload)
            logger.info("%s: averaged extractor of round %d loaded", self.device, round_)
        elif kind == P.KIND_SOFT_LABELS:
            ids, logits = payload
            engine.receive_soft_labels(ids, logits, round_)
            self.progress.soft_label_round = max(self.progress.soft_label_round, round_)
            logger.info("%s: soft labels for %d samples (round %d)", self.device, len(ids), round_)

    def ready(self, recipe: RunRecipe, header: dict, waited: float) -> bool:
        """Train round r once soft labels of round r-1 are in (or the runtime sent none, or ``waited`` seconds
        passed its ``soft_labels_wait_s``); FedAvg: once round r's global model is here."""
        data = header.get("data", {})
        if recipe.algorithm == "fedavg":
            return self.global_round >= header["round"]
        needs = data.get("soft_labels_round")
        if needs is None or self.device not in data.get("soft_labels_to", []) or \
                self.progress.soft_label_round >= needs:
            return True
        return waited > float(data.get("soft_labels_wait_s", 30.0))

    def run(self, engine: EdgeEngine, recipe: RunRecipe, header: dict) -> None:
        """One announced round (a ROUND frame's header). Returns when it is done, or not done (stopped, a new
        runtime session, a rejection): a later announcement then resumes it without redoing what is saved."""
        round_, data = header["round"], header.get("data", {})
        session, progress = data.get("session"), self.progress
        if progress.done_already(round_, session):
            if round_ < progress.last_done:
                logger.info("%s: ignoring an announcement of round %d: round %d is done", self.device, round_,
                            progress.last_done)
            return
        if recipe.algorithm == "fedavg":
            self.run_fedavg(engine, recipe, round_, session)
            return
        if round_ > progress.trained_round:
            stats = self._train(engine, recipe, round_)
            progress.trained_round = round_
            self.save()  # a crash during the upload resends without retraining
            metrics = {"train_loss": stats.loss, "train_accuracy": stats.train_accuracy,
                       "train_seconds": stats.seconds, "samples_per_s": stats.samples_per_s,
                       "kd_coverage": stats.kd_coverage}
        else:  # trained already (we or the runtime restarted before the upload landed): resend only
            logger.info("%s: re-sending round %d without retraining", self.device, round_)
            metrics = {"resent": True}
        # test first: the train upload is what lets the runtime move on (async: at once), and a transfer is sent
        # only after the previous one's verdict
        splits = (["test"] if data.get("eval") and engine.test_set is not None else []) + ["train"]
        if progress.accepted["session"] == session and progress.accepted["round"] == round_:
            splits = [s for s in splits if s not in progress.accepted["splits"]]  # the runtime has those
        else:
            progress.accepted = {"session": session, "round": round_, "splits": []}
        share_extractor = bool(data.get("average_extractors"))
        for split in splits:
            upload = engine.extract(split, round_)
            upload.features = self.privatize(upload.features, recipe)
            upload.round, upload.metrics = round_, (metrics if split == "train" else {})
            sent = self.send_upload(upload, recipe.codec, engine.extractor_state()
                                    if share_extractor and split == "train" else None, session)
            upload = None  # one split's features in memory at a time (a small device's peak)
            if not sent:
                return  # the round is not done (a later ROUND resends what the runtime lacks)
            progress.accepted["splits"].append(split)
            if split != splits[-1]:
                self.save()  # a restart before the round is done re-sends only what the runtime lacks
        progress.last_done, progress.done_session = round_, session
        self.save()

    def privatize(self, features, recipe: RunRecipe):
        """The run's feature privacy (off unless the recipe sets it); a re-send of the same features is the
        same release (:func:`edge_sdk.privacy.noise_rng`)."""
        mechanism = recipe.privacy
        if mechanism.clip_norm is None:
            return features
        if self._key is None and self.state_dir is not None:
            self._key = device_key(self.state_dir)
        rng = noise_rng(self._key, features)
        return privatize_features(features, mechanism.clip_norm, mechanism.noise_multiplier, rng)

    def run_fedavg(self, engine: EdgeEngine, recipe: RunRecipe, round_: int, session: str | None) -> None:
        """FedAvg: start from the global model with a fresh optimizer, train locally, send the weights back."""
        assert self.global_state is not None
        engine.load_model_state(self.global_state)
        engine.reset_optimizer()
        stats = self._train(engine, recipe, round_)
        arrays, meta = P.encode_state(engine.model_state(), recipe.model_codec)
        meta.update(kind=P.KIND_MODEL_UPDATE, samples=len(engine.train_set),
                    metrics={"train_loss": stats.loss, "train_accuracy": stats.train_accuracy,
                             "train_seconds": stats.seconds, "samples_per_s": stats.samples_per_s})
        if not self.send(P.pack_arrays(arrays), round_, meta, "model update", session):
            return  # stopped, a new runtime session, or rejected: the round is not done
        self.progress.trained_round = self.progress.last_done = round_
        self.progress.done_session = session
        self.save()

    def send_upload(self, upload, codec: str, extractor: dict | None, session: str | None) -> bool:
        """Encode one split's upload (:func:`edge_sdk.wire.upload_blob`) and send it until the verdict."""
        blob, meta = P.upload_blob(upload, codec, extractor)
        return self.send(blob, upload.round, meta, f"{upload.split} features", session)

    def _train(self, engine: EdgeEngine, recipe: RunRecipe, round_: int) -> RoundStats:
        stats = engine.train_round(round_)
        self.step_times.append(stats.seconds / max(1, -(-stats.samples // recipe.edge.batch_size)))
        logger.info("%s %sround %d: loss %.3f (ce %.3f kd %.3f) acc %.3f, %d samples at %.0f/s", self.device,
                    "fedavg " if recipe.algorithm == "fedavg" else "", round_, stats.loss, stats.ce, stats.kd,
                    stats.train_accuracy, stats.samples, stats.samples_per_s)
        return stats
