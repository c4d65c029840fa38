"""FedGKT (He et al., NeurIPS 2020): the server trains the large model on the devices' features and
answers each device with soft labels for exactly the sample ids it uploaded.

:class:`FedGKT` holds what both modes share (the server, accepted uploads, extractor averaging,
evaluation); :class:`FedGKTSync` runs rounds with a deadline and quorum, :class:`FedGKTAsync` lets
every device run at its own pace (``fedgkt_async.py``).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict
from pathlib import Path

import torch

from cloud_runtime.aggregation import (average_torch_states, clip_to_median, coordinate_median, layer_divergence,
                                       staleness_weights)
from cloud_runtime.server_trainer import GKTServer
from cloud_runtime.registry import Rejected
from cloud_runtime.strategies.base import STRATEGIES, Strategy, check_batch_norm
from edge_sdk import protocol as P
from cloud_runtime.features import HeldUpload
from model_zoo import create_model, seeded

logger = logging.getLogger("edgefl.runtime")

OVERLAPPED = "overlapped with the next round"  # a row's evaluation while it runs (committed with the next round)


EXTRACTOR_CLIP_MULTIPLIER = 3.0  # a device's extractor may lie this many times the median distance from the centre


def clipped_extractors(states: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """The devices' extractors, each pulled toward their coordinate median to at most
    :data:`EXTRACTOR_CLIP_MULTIPLIER` x the median distance from it (3 or more devices; fewer have no robust
    centre), before they are averaged: every device loads the average, so one device's extractor, within every
    bound but far from the others' (weights at +-1e4, variances of 0), must not move it far enough to make the
    honest devices' features implausible (found by a review with a valid device credential). Integer buffers
    are left as sent. Clipping as FedAvg's (``aggregation.clip_to_median``, Sun et al. 2019's norm bound)."""
    if len(states) < 3:
        return states
    floats = [{k: v.detach().cpu().numpy() for k, v in s.items() if v.is_floating_point()} for s in states]
    clipped, _, _ = clip_to_median(floats, coordinate_median(floats), EXTRACTOR_CLIP_MULTIPLIER)
    return [{**s, **{k: torch.from_numpy(v) for k, v in c.items()}} for s, c in zip(states, clipped)]


class FedGKT(Strategy):
    uplink_kind = P.KIND_UPLOAD

    def __init__(self, ctx):
        super().__init__(ctx)
        self.server: GKTServer | None = None
        self.train_uploads: dict[str, HeldUpload] = {}   # device -> its latest accepted train upload
        self.test_uploads: dict[str, HeldUpload] = {}
        self.extractors: dict[str, tuple[dict, int]] = {}   # fedgkt.average_extractors: latest per device
        self.server_version = 0                              # server updates so far (async staleness clock)
        self.arrival_version: dict[str, int] = {}            # device -> server_version when its upload arrived
        self.extractor_reference: dict | None = None         # the run's extractor (names, shapes, dtypes)
        self._channels: dict[tuple, int] = {}                # (classes, C x H x W) -> the edge model's channels
        self.round_divergence: dict | None = None            # extractor averaging: this round's layer divergence
        self._said_unclipped = False                         # warned once that 2 extractors were averaged

    def build(self) -> None:
        feature_shape = None
        if self.input_shape is not None:  # the run's edge model on the run's images: the features' shape
            c, h, w = self.input_shape
            edge = create_model(self.cfg.edge.model, num_classes=self.num_classes, in_channels=c,
                                **self.cfg.edge.model_kwargs).eval()
            with torch.no_grad():
                feature_shape = tuple(edge(torch.zeros(1, c, h, w))[1].shape[1:])
            self.feature_channels = feature_shape[0]
            stem = getattr(edge, "stem", None)
            if stem is not None:  # extractor averaging: names and shapes are the run's, not the first uploader's
                self.extractor_reference = {k: v.detach().clone() for k, v in stem.state_dict().items()}
        model = create_model(self.cfg.server.model, num_classes=self.num_classes,
                             feature_channels=self.feature_channels, **self.cfg.server.model_kwargs)
        spec = {"name": self.cfg.server.model, "num_classes": self.num_classes,
                "feature_channels": self.feature_channels, "kwargs": dict(self.cfg.server.model_kwargs)}
        self.server = GKTServer(model, self.cfg.server, self.num_classes, seed=self.cfg.seed,
                                spill_dir=str(Path(self.cfg.state_dir) / "features"), group=self.ctx.group,
                                model_spec=spec)
        self.server.feature_shape = feature_shape
        state = self.ctx.store.load_model("server")
        if state is not None:
            self.server.load_state_dict(state)
            logger.info("server model restored from %s", self.ctx.store.files["server"])

    def models(self) -> dict[str, torch.nn.Module]:
        return {"server": self.server} if self.server is not None else {}

    def close(self) -> None:
        if self.server is not None:
            self.server.train_store.clear()  # memory-mapped feature files go with the run

    def restore(self, state: dict) -> None:
        super().restore(state)
        for row in self.rows:  # committed while its evaluation ran, which the runtime did not live to finish
            if row.get("evaluation") == OVERLAPPED:
                row["evaluation"] = ("lost: the runtime stopped before this round's evaluation, which overlapped "
                                     "the next round, finished (fedgkt.overlap_evaluation: false evaluates first)")
                logger.warning("round %d has no test accuracy: its overlapped evaluation did not finish before the "
                               "runtime stopped", row["round"])

    def run_feature_channels(self, num_classes: int, input_shape: list[int]) -> int:
        key = (num_classes, tuple(input_shape))
        if key not in self._channels:
            c, h, w = input_shape
            with seeded(self.cfg.seed), torch.no_grad():  # draws nothing from the process's RNG (memory mode
                edge = create_model(self.cfg.edge.model, num_classes=num_classes, in_channels=c,  # shares it)
                                    **self.cfg.edge.model_kwargs).eval()
                self._channels[key] = int(edge(torch.zeros(1, c, h, w))[1].shape[1])
        return self._channels[key]

    # -- accepting uploads --------------------------------------------------------------------------

    def _extractor_bytes(self) -> int | None:
        """What the extractor an upload carries (extractor averaging) may take, fp32; None: not known yet."""
        reference = self.extractor_reference
        return sum(v.numel() * 4 for v in reference.values()) + 65536 if reference else None

    def decoded_limit(self, device: str, meta: dict) -> int | None:
        """An upload's bound (``Ingest.decoded_limit``), once the run's feature shape is known (before it, the
        bound would allow any shape: None)."""
        if self.server is None or self.server.feature_shape is None:
            return None
        return self.ctx.ingest.decoded_limit(device, meta.get("split"), self.num_classes, self.server.feature_shape,
                                             self._extractor_bytes())

    def take(self, device: str, done: P.CompletedTransfer) -> str:
        server = self.server
        reference = self.extractor_reference
        upload, extractor = self.ctx.ingest.decode_upload(
            device, done, self.num_classes, server.feature_shape if server else None, self._extractor_bytes())
        if upload.features.shape[1] != self.feature_channels:
            raise Rejected("bad_shape", f"{upload.split} features have {upload.features.shape[1]} channels, the run "
                                        f"has {self.feature_channels}")
        if extractor and upload.split == "train":
            if reference is None:  # no run input shape configured: the first accepted extractor sets the form
                reference = next(iter(self.extractors.values()))[0] if self.extractors else None
            state = P.arrays_to_state(extractor, reference)  # may reject: nothing recorded yet
            bound = self.cfg.validation.max_abs_weight
            peak = max((float(v.abs().max()) for v in state.values() if v.is_floating_point() and v.numel()),
                       default=0.0)
            if peak > bound:  # every device loads the average: one device's huge weights would break them all
                raise Rejected("implausible_values", f"extractor: max |weight| {peak:.3g} > {bound:g}")
            check_batch_norm(state, "extractor")
        store = self.train_uploads if upload.split == "train" else self.test_uploads
        replaced = device in store and store[device].round == upload.round
        if upload.split == "train" and server is not None:  # held once: the server's store is the upload
            upload = server.ingest(upload)                  # (what it replaces is freed now, not at training)
        if extractor and upload.split == "train":           # accepted from here on: nothing below can refuse it
            self.extractors[device] = (state, len(upload.sample_ids))
        self.ctx.ingest.claim(device, upload)
        if server is not None and server.feature_shape is None:  # no run input shape: the first upload's pins it
            server.feature_shape = tuple(upload.features.shape[1:])
        store[device] = upload  # keyed by device: a re-sent transfer replaces, never double-counts
        self.ctx.ingest.count_accepted(device, done, replaced)
        if upload.split == "train":
            self.arrival_version[device] = self.server_version
            self.ctx.registry.devices[device]["last_metrics"] = upload.metrics
        return (f"{upload.split} upload of round {done.round} accepted: {len(upload.sample_ids)} samples, "
                f"{done.wire_bytes / 1e6:.2f} MB ({done.chunks} chunks){' (replaces a resend)' if replaced else ''}")

    # -- training and answering ---------------------------------------------------------------------

    def round_frame(self, round_: int, eval_: bool, soft_labels_to: list[str]) -> dict:
        """What a round announcement tells devices."""
        return dict(session=self.ctx.downlink.session, eval=eval_, deadline_s=self.cfg.round_deadline_s,
                    soft_labels_round=round_ - 1 if soft_labels_to else None, soft_labels_to=soft_labels_to,
                    soft_labels_wait_s=self.cfg.soft_labels_wait_s,
                    average_extractors=self.cfg.fedgkt.average_extractors)

    def train_and_answer(self, round_: int, devices: list[str]) -> dict:
        """Train the server on the devices' features; send each of ``devices`` its soft labels."""
        assert self.server is not None
        self.use_threads()
        for device in devices:  # accepted uploads are held already (take); these are set by other means
            upload, held = self.train_uploads[device], self.server.train_store.get(device)
            if held is None or held.round != upload.round or held.sample_ids is not upload.sample_ids:
                self.train_uploads[device] = self.server.ingest(upload)
        self.drop_stale(round_)
        self.phase("server training", round_,
                   len(self.server.train_store) * self.cfg.server.epochs)
        replies, stats = self.server.train_round(round_, progress=self.ctx.registry.telemetry.progress,
                                                 stop=self.ctx.stop)  # logs progress; stops on stop
        self.phase("sending soft labels", round_)
        replies = {d: m for d, m in replies.items() if d in devices}
        if self.cfg.fedgkt.average_extractors:
            self.average_extractors(round_, devices)
        for device, message in replies.items():
            arrays, meta = P.soft_labels_to_arrays(message)
            self.ctx.downlink.send_arrays([device], arrays, message.round, meta)
        logger.info("round %d server: loss %.3f acc %.3f on %d samples from %d devices at %.0f/s", round_, stats.loss,
                    stats.train_accuracy, stats.samples, len(devices), stats.samples_per_s)
        return asdict(stats)

    def drop_stale(self, round_: int) -> None:
        """Forget features too old to train on (each mode has its own clock)."""

    def average_extractors(self, round_: int, devices: list[str]) -> None:
        """FedAvg of the devices' extractors (async: staleness-discounted), sent back before the soft labels."""
        names = [d for d in sorted(self.extractors) if d in devices]
        if not names:
            return
        weights = [self.extractors[d][1] for d in names]
        if self.cfg.mode == "async":
            stale = [self.server_version - self.arrival_version.get(d, self.server_version) for d in names]
            weights = [w * s for w, s in zip(weights, staleness_weights(stale))]
        if len(names) == 2 and not self._said_unclipped:  # once a run: a 2-device run would say it every round
            self._said_unclipped = True                       # (1 extractor "averaged" is that device's own)
            logger.warning("round %d: extractors of 2 devices averaged unclipped: 2 have no robust centre, so "
                           "one device's extractor can move what both load (fedgkt.average_extractors: false "
                           "keeps each device's own)", round_)
        average = average_torch_states(clipped_extractors([self.extractors[d][0] for d in names]), weights)
        self.round_divergence = layer_divergence(  # eq. 1 of the deeper-models study, per extractor tensor
            [{k: v.detach().cpu().numpy() for k, v in self.extractors[d][0].items()} for d in names],
            {k: v.numpy() for k, v in average.items()})
        arrays, meta = P.state_to_arrays(average, "fp32")
        meta["kind"] = P.KIND_EXTRACTOR
        self.ctx.downlink.send_arrays(devices, arrays, round_, meta)
        logger.info("round %d: extractors of %d devices averaged", round_, len(names))

    def evaluate(self, row: dict) -> None:
        """Each device's test features through the server model (FedGKT's evaluation), on this thread."""
        if not self.test_uploads or self.server is None:
            row["test_accuracy"] = None
            return
        self.use_threads()
        self.phase("evaluating", row.get("round"))
        # not cut short by a stop: the round is trained, and a few seconds more save it with its accuracy
        result = self.server.evaluate(list(self.test_uploads.values()), round_=row.get("round"))
        self.record_evaluation(row, result)

    @staticmethod
    def record_evaluation(row: dict, result) -> None:
        row.update(test_accuracy=result.accuracy, test_loss=result.loss, test_samples=result.samples,
                   mean_device_accuracy=result.mean_device_accuracy, per_device=result.per_device)

    def start_evaluation(self, row: dict) -> "Evaluation | None":
        """Evaluate this round's test features on a thread of one torch thread while the devices train the next
        round (they have the cores). The result is the same as :meth:`evaluate`'s: nothing changes the model
        until :meth:`finish_evaluation` has joined it, which comes before the next server training."""
        if not self.test_uploads or self.server is None:
            row["test_accuracy"] = None
            return None
        row.update(test_accuracy=None, evaluation=OVERLAPPED)
        pending = Evaluation(self.server, list(self.test_uploads.values()), row)
        pending.start()
        return pending

    def finish_evaluation(self, pending: "Evaluation | None") -> None:
        """Join an overlapped evaluation and record it in its round's row (on the serve thread: the console reads
        rows there). One that failed or was stopped leaves the row without accuracy, named in the log."""
        if pending is None:
            return
        if pending.is_alive() and self.ctx.stop.is_set():
            logger.info("stopping: waiting for round %d's evaluation (seconds), so the round is saved with its "
                        "accuracy", pending.row["round"])
        pending.threads = self.ctx.threads  # the devices are done and the server waits: its remaining batches
        pending.join()                      # get every core the runtime has
        row = pending.row
        row.pop("evaluation", None)
        if pending.result is None:
            row["evaluation"] = f"failed: {pending.error}"
            logger.warning("round %d evaluation failed (%s): no test accuracy for that round", row["round"],
                           pending.error)
            return
        self.record_evaluation(row, pending.result)
        logger.info("round %d test accuracy %.4f (evaluated while devices trained the next round)", row["round"],
                    pending.result.accuracy)
        self.ctx.registry.telemetry.event("round", None, f"round {row['round']} test accuracy "
                                                         f"{pending.result.accuracy:.4f}")

    def finish_row(self, row: dict, start: float) -> None:
        row.setdefault("edge", {d: dict(self.train_uploads[d].metrics) for d in row["participants"]})
        # what this round trained on: the invariant the fault drills check
        row.setdefault("accepted_samples", {d: int(len(self.train_uploads[d].sample_ids))
                                            for d in row["participants"] if d in self.train_uploads})
        if self.round_divergence:  # the extractors' divergence before this round's average (eq. 1)
            row.setdefault("divergence", self.round_divergence)
            self.round_divergence = None
        super().finish_row(row, start)


class Evaluation(threading.Thread):
    """:meth:`GKTServer.evaluate` on its own thread with one torch thread while the devices train, and with
    ``threads`` (set by the serve thread when it comes to join it: the devices are done) for the batches left;
    ``result`` (None if it failed: then ``error`` says why). It is not cut short by a stop: the runtime joins it
    and commits the round with its accuracy (a few seconds), as a serial run would have."""

    def __init__(self, server: GKTServer, uploads: list, row: dict):
        super().__init__(name=f"evaluation-{row['round']}", daemon=True)
        self.server, self.uploads, self.row = server, uploads, row
        self.result, self.error = None, None
        self.threads = 1

    def _set_threads(self) -> None:
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)

    def run(self) -> None:
        # the serve thread sets its own count again before the server trains
        try:
            self.result = self.server.evaluate(self.uploads, round_=self.row["round"], before_batch=self._set_threads)
        except Exception as e:  # a failed evaluation costs its accuracy, never the run
            logger.exception("round %d evaluation failed", self.row["round"])
            self.error = f"{type(e).__name__}: {e}"


@STRATEGIES.register("fedgkt_sync")
class FedGKTSync(FedGKT):
    """Rounds: announce (retained) -> collect uploads until all reachable devices or deadline + quorum ->
    train the server -> soft labels -> checkpoint -> announce the next round, evaluating this one meanwhile."""

    def run(self) -> None:
        """Rounds as the class docstring says. A round's evaluation overlaps the next round's device training
        (it is joined before the server trains again, so every round's figures are those of a serial run); the
        last round evaluates before its checkpoint."""
        ctx = self.ctx
        previous: list[str] = list(self.rows[-1].get("participants", [])) if self.rows else []
        pending: Evaluation | None = None
        try:
            for round_ in range(self.next_round, self.cfg.rounds):
                if ctx.stop.is_set():
                    return
                last = round_ == self.cfg.rounds - 1
                eval_ = (round_ + 1) % self.cfg.eval_every == 0 or last
                self.train_uploads.clear()
                self.test_uploads.clear()
                ctx.ingest.new_round()
                start = time.monotonic()
                ctx.downlink.broadcast(P.ROUND, round_, **self.round_frame(round_, eval_, previous))
                logger.info("round %d open (deadline %.0fs, eval %s)", round_, self.cfg.round_deadline_s, eval_)
                self.phase("devices training", round_)
                if eval_:
                    done = lambda: set(self.train_uploads) & set(self.test_uploads)  # noqa: E731
                else:
                    done = lambda: set(self.train_uploads)  # noqa: E731
                if not self.collect(round_, done):
                    return
                participants = sorted(self.train_uploads)
                row: dict = {"round": round_, "participants": participants,
                             "upload_seconds": time.monotonic() - start}
                self.finish_evaluation(pending)  # the model trains next: the last round's evaluation is done first
                pending = None
                row["server"] = self.train_and_answer(round_, participants)
                if eval_ and (last or not self.cfg.fedgkt.overlap_evaluation):
                    self.evaluate(row)
                elif eval_:
                    pending = self.start_evaluation(row)
                else:
                    row["test_accuracy"] = None
                self.finish_row(row, start)
                previous = participants
                self.next_round = round_ + 1
                self.phase("checkpoint", round_)
                ctx.checkpoint()  # a round's accuracy evaluated while the next runs is committed with that one
        finally:
            self.finish_evaluation(pending)

    def drop_stale(self, round_: int) -> None:
        """A device that stopped uploading: its features age out after ``max_staleness`` rounds."""
        assert self.server is not None
        for device, stored in list(self.server.train_store.segments.items()):
            if round_ - stored.round > self.cfg.max_staleness:
                self.server.drop_device(device)
                logger.info("%s: features of round %d dropped from server training (stale)", device, stored.round)
