"""``edge-agent``: the daemon on each device.

Connects to the broker (Last Will = offline), learns the run from the runtime (a :class:`RunRecipe` on
every HELLO and round announcement), builds its engine (``engine``: torch, or onnxruntime running the edge
program the runtime compiled and announced by digest), registers, and follows the cloud's rounds: train
the extractor locally, upload features/logits/labels of every local sample (compressed, chunked, until
the runtime accepts them: ``uplink.py``), take the server's soft labels by sample id, repeat. State is
checkpointed atomically (``state.py``) so a restart resumes without redoing or losing work.

All network callbacks only enqueue; training and encoding happen on the main thread. Torch-free: the
torch engine is imported only when a device chooses it.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import queue
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edge_sdk import wire as P
from edge_sdk.config import AgentConfig, RunRecipe, without_code_checks
from edge_sdk.engine import EdgeEngine
from edge_sdk.engines import engine_class
from edge_sdk.program.cache import ProgramCache, is_digest
from edge_sdk.program.format import MAX_PROGRAM_BYTES, ProgramError, program_digest, unpack_program
from edge_sdk.state import check_state_identity, read_state, state_problem, write_state
from edge_sdk.uplink import Uplink
from edge_sdk.wire import MessageError, round_frame_problem
from edgefl_core.config import ConfigError, build_dataclass
from edgefl_core.data.datasets import DatasetError, ImageDataset, dataset_stats
from edgefl_core.data.local import data_fingerprint, describe_data, load_local_data
from edgefl_core.proc import peak_rss_mb
from edgefl_core.reliable import parse_progress
from edgefl_core.transport import Transport, create_transport
from edgefl_core.transport.retry import connect_patiently
from edgefl_core.transport.inbox import drain

logger = logging.getLogger("edgefl.agent")

STATE_FILE = "agent_state.safetensors"
OLD_STATE_FILE = "agent_state.pt"   # torch.save states of earlier versions: not read (never unpickled)
MAX_ANNOUNCED_PROGRAMS = 256  # one per distinct edge recipe of a run (edge_overrides)
PROGRAM_REQUEST_S = (150.0, 1200.0)  # no engine yet: register again (the runtime re-sends) after this, doubling


class EdgeAgent:
    """The device daemon. ``recipe`` stays None until the runtime has said what to train; ``client`` (the
    :class:`~edge_sdk.engine.EdgeEngine`) until it is built (onnxruntime: once the edge program is here)."""

    def __init__(self, cfg: AgentConfig, transport: Transport, train: ImageDataset, test: ImageDataset | None,
                 fingerprint: str | None = None):
        self.cfg = cfg
        self.transport = transport
        self.train_set, self.test_set = train, test
        self.client: EdgeEngine | None = None
        self.recipe: RunRecipe | None = None
        self.device = cfg.device_id
        self.topics = P.Topics(cfg.run_id)
        self.inbox: queue.Queue = queue.Queue()
        # every downlink transfer names this device: the per-device budget is the whole budget; expire() frees
        # what a crashed runtime left half-sent
        self.reassembler = P.Reassembler(timeout_s=600, max_pending_per_device=64)
        self.state_path = Path(cfg.state_dir) / STATE_FILE
        self.last_done = -1                  # last round whose upload this device finished
        self.trained_round = -1              # last round whose local training finished (upload may be pending)
        # the splits of a round not done yet that the runtime (session) already accepted: never sent again
        self.accepted: dict = {"session": None, "round": -1, "splits": []}
        saved = read_state(self.state_path) or {}  # the session it last finished a round for: its end is obeyed
        mine = saved.get("device") == self.device and saved.get("run") == cfg.run_id
        self.done_session: str | None = (saved.get("done_session") or None) if mine else None
        self.soft_label_round = -1
        self.data_fingerprint = fingerprint or data_fingerprint(train, test)  # build_agent has it already
        self.run_instance: str | None = None  # the runtime's run instance (HELLO / ROUND): a new one is a new run
        self.pending_round: dict | None = None
        self.uplink = Uplink(transport, self.topics, self.device, cfg.upload)  # acknowledged transfers
        self.registered_session: str | None = None
        self.global_state: dict | None = None   # FedAvg: the latest global model and its round
        self.programs = ProgramCache(Path(cfg.state_dir) / "programs")
        self.announced_programs: list[str] = []  # digests the runtime announced (HELLO / ROUND recipe)
        self.received_program: bytes | None = None  # a program transfer whose digest is not announced yet
        self.refused_programs: set[str] = set()      # digests refused here (never tried again this run)
        self._program_request = (0.0, PROGRAM_REQUEST_S[0])  # (last registration without an engine, wait)
        self.program_digest: str | None = None
        self.run_seed: int | None = None  # the runtime's seed of the initial edge model (run_facts)
        self.global_round = -1
        self.stop = threading.Event()
        self.step_times: list[float] = []
        self.rejected = 0
        self.internal_errors = 0
        self.exit_code = 0   # 2: stopped because this device cannot take part as configured
        self._last_heartbeat = 0.0

    # -- persistence ---------------------------------------------------------------------------------

    def save_state(self) -> None:
        if self.client is None:
            return
        engine = self.client
        write_state(self.state_path, meta={
            "soft_round": engine.soft_labels.round, "last_done": self.last_done, "trained_round": self.trained_round,
            "done_session": self.done_session or "", "device": self.device, "run": self.cfg.run_id,
            "recipe": json.dumps(asdict(self.recipe), sort_keys=True), "data": self.data_fingerprint,
            "instance": self.run_instance or "", "accepted": json.dumps(self.accepted), "engine": engine.name,
            "program": self.program_digest or ""},
            model=engine.model_state(), optimizer=engine.optimizer_state(), soft_logits=engine.soft_labels.logits,
            soft_present=engine.soft_labels.present)

    def load_state(self) -> bool:
        """Resume from the saved state when it is this device's, this run's and this recipe's, and fits the
        current data; otherwise start fresh (with a warning naming why), never crash. Either engine resumes
        the other's state (model, optimizer, soft labels are saved under portable names)."""
        state = read_state(self.state_path) if self.client is not None else None
        if state is None:
            return False
        engine = self.client
        problem = state_problem(state, device=self.device, run=self.cfg.run_id,
                                recipe=json.dumps(asdict(self.recipe), sort_keys=True),
                                model={k: v.shape for k, v in engine.model_state().items()},
                                soft_shape=engine.soft_labels.logits.shape, instance=self.run_instance)
        if problem is None:
            try:
                engine.load_optimizer_state(state["optimizer"])
            except (KeyError, ValueError, TypeError) as e:
                problem = f"its optimizer state does not fit ({e})"
        if problem is not None:
            logger.warning("%s: ignoring the saved state: %s", self.state_path, problem)
            return False
        engine.load_model_state(state["model"])
        engine.soft_labels.load(state["soft_logits"], state["soft_present"], int(state["soft_round"]))
        self.soft_label_round = int(state["soft_round"])
        self.last_done = int(state["last_done"])
        self.trained_round = int(state.get("trained_round", self.last_done))
        self.done_session = state["done_session"] or None
        self.accepted = _accepted_mark(state.get("accepted"))
        logger.info("%s resumed from %s%s: last finished round %d", self.device, self.state_path,
                    f" (saved by the {state.get('engine')} engine)" if state.get("engine") not in (None, engine.name)
                    else "", self.last_done)
        return True

    # -- network (callbacks run on the network thread: enqueue only) --------------------------------

    def enqueue(self, topic: str, payload: bytes) -> None:
        self.inbox.put((topic, payload))

    def start(self) -> None:
        self.transport.subscribe(self.topics.down(self.device), self.enqueue)
        self.transport.subscribe(self.topics.control, self.enqueue)
        if not connect_patiently(self.transport, self.stop, self.device):
            return  # stopped while waiting (SIGTERM): nothing to say goodbye to
        self.transport.publish(self.topics.status(self.device),
                               P.control_frame(P.STATUS, run=self.cfg.run_id, device=self.device, round_=-1,
                                               online=True), retain=True)
        logger.info("%s: connected; waiting for the runtime's run recipe", self.device)

    def configure(self, data: dict) -> bool:
        """Build the engine from the run recipe in a HELLO / ROUND frame (once per process; onnxruntime: once
        the announced edge program is here too).

        Returns False (and logs what was wrong) when the frame carries no valid recipe."""
        raw = data.get("recipe")
        if not isinstance(raw, dict):
            return False
        overrides = data.get("edge_overrides") or {}
        mine = overrides.get(self.device) if isinstance(overrides, dict) else None
        if isinstance(mine, dict) and isinstance(raw.get("edge"), dict):
            raw = {**raw, "edge": {**raw["edge"], **mine}}
        try:
            if self.cfg.engine == "torch":
                recipe = build_dataclass(RunRecipe, raw, "recipe")
            else:  # the compiled program is the code: model and trainer names are not this device's to check
                with without_code_checks():
                    recipe = build_dataclass(RunRecipe, raw, "recipe")
        except ConfigError as e:
            logger.error("%s: the runtime's run recipe is not usable here: %s", self.device, e)
            return False
        instance = data.get("instance") if isinstance(data.get("instance"), str) else None
        if self.recipe is not None and instance and self.run_instance and instance != self.run_instance:
            logger.warning("%s: the runtime started run %s afresh (instance %s, was %s): this device starts it "
                           "afresh too", self.device, self.cfg.run_id, instance[:16], self.run_instance[:16])
            self.client = self.recipe = self.pending_round = self.global_state = self.done_session = None
            self.last_done = self.trained_round = self.soft_label_round = self.global_round = -1
            self.accepted = {"session": None, "round": -1, "splits": []}
            self.program_digest = self.received_program = None
            self.announced_programs, self.refused_programs = [], set()  # the new instance announces its own
        self.run_instance = instance or self.run_instance
        self.note_programs(data.get("edge_programs"))
        if self.recipe is None and not self.fit_run_facts(data.get("run_facts")):
            return False
        if self.recipe is not None:
            if recipe != self.recipe:
                logger.error("%s: the runtime changed the run recipe mid-run; keeping the one this device "
                             "started with (restart the agent to take the new one)", self.device)
            if self.client is None:
                self.try_program()
            return True
        edge = recipe.edge
        if self.cfg.engine == "onnxruntime":
            self.recipe = recipe
            logger.info("%s: run recipe: %s, model %s, trainer %s, codec %s (engine onnxruntime)", self.device,
                        recipe.algorithm, edge.model, edge.trainer, recipe.codec)
            if not self.try_program():
                logger.info("%s: waiting for the runtime's edge program (compiled graphs for %s + %s)", self.device,
                            edge.model, edge.trainer)
            return True
        try:
            TorchEngine = engine_class("torch")
        except ImportError as e:  # a device installed without torch (the base install is onnxruntime's)
            logger.error("%s: engine: torch needs torch (%s): install it (pip install torch==2.13.0, then this package with its torch extra) "
                         "or set engine: onnxruntime in the agent config", self.device, e)
            self.exit_code = 2
            self.stop.set()
            return False
        try:
            client = TorchEngine(self.device, edge, self.train_set, self.test_set, stats_name=self._stats_name(),
                                 seed=self.cfg.seed, threads=self.cfg.threads, init_seed=self.run_seed)
        except Exception as e:  # the recipe came over the wire: whatever it breaks, the agent keeps running
            logger.error("%s: cannot build %s from the runtime's recipe: %s: %s", self.device, edge.model,
                         type(e).__name__, e)
            return False
        self.recipe, self.client = recipe, client
        logger.info("%s: run recipe: %s, model %s, trainer %s, codec %s", self.device, recipe.algorithm, edge.model,
                    edge.trainer, recipe.codec)
        self.load_state()
        return True

    def _stats_name(self) -> str | None:
        return self.cfg.data.dataset if dataset_stats(self.cfg.data.dataset) else None

    def note_programs(self, digests) -> None:
        """The edge programs the runtime announced (``edge_programs``: hex SHA-256 digests) in a recipe frame,
        which only the runtime may publish (broker ACLs)."""
        if isinstance(digests, list):
            fresh = [d for d in digests[:MAX_ANNOUNCED_PROGRAMS] if is_digest(d) and d not in self.announced_programs
                     and d not in self.refused_programs]
            self.announced_programs = (self.announced_programs + fresh)[-MAX_ANNOUNCED_PROGRAMS:]

    def try_program(self) -> bool:
        """onnxruntime: build the engine from an announced program (received, or cached from an earlier
        transfer or ``edge-agent program install``) that is this recipe's. True once the engine is built."""
        if self.cfg.engine != "onnxruntime" or self.client is not None or self.recipe is None:
            return self.client is not None
        candidates = []  # (digest, blob): each blob hashed once
        if self.received_program is not None:
            digest = program_digest(self.received_program)
            if digest in self.announced_programs:
                candidates.append((digest, self.received_program))
                self.received_program = None  # judged once
        candidates += [(d, blob) for d in reversed(self.announced_programs) for blob in [self.programs.load(d)] if blob]
        for digest, blob in candidates:
            if digest in self.refused_programs:
                continue
            try:
                program = unpack_program(blob, digest)
                if program.manifest.get("edge") != asdict(self.recipe.edge):
                    continue  # another device's (an edge override) or another recipe's program
                engine = engine_class("onnxruntime")(self.device, program, self.train_set, self.test_set,
                                                     stats_name=self._stats_name(), seed=self.cfg.seed,
                                                     threads=self.cfg.threads)
            except Exception as e:  # ProgramError, onnxruntime refusing a graph, ...: the device keeps running
                self.refuse_program(digest, f"{type(e).__name__}: {str(e)[:300]}")
                continue
            self.programs.save(blob)
            self.client, self.program_digest = engine, digest
            logger.info("%s: edge program %s (%s, %d graphs, %.0f KB) loaded; engine onnxruntime", self.device,
                        digest[:12], program.manifest["trainer"], len(program.graphs), len(blob) / 1024)
            self.load_state()
            if self.registered_session is not None:  # tell the runtime what this device now runs
                self.register(self.registered_session)
            return True
        return False

    def fit_run_facts(self, facts) -> bool:
        """Check this device's data against the run's classes and image shape (sent with the recipe). A device
        whose labels stop short of the run's classes takes the run's count; data of another shape or with
        more classes cannot take part: say so and stop with exit status 2 (a configuration error)."""
        if not isinstance(facts, dict):
            return True  # a runtime that does not state them judges the registration itself
        seed = facts.get("seed")
        self.run_seed = seed if type(seed) is int and 0 <= seed < 2**32 else None
        classes, shape = facts.get("num_classes"), facts.get("input_shape")
        train = self.train_set
        problem = None
        if isinstance(shape, list) and shape != list(train.image_shape):
            problem = (f"this device's images are {'x'.join(map(str, train.image_shape))} (C x H x W); the run's are "
                       f"{'x'.join(map(str, shape))}")
        elif type(classes) is int and classes < train.num_classes:
            problem = f"this device's data has {train.num_classes} classes; the run has {classes}"
        if problem:
            logger.error("%s: %s. Point data at images the run can use (edge-agent data check; docs/DEPLOYMENT.md, "
                         "'A device's own data')", self.device, problem)
            self.exit_code = 2
            self.stop.set()
            return False
        if type(classes) is int and classes > train.num_classes:
            logger.info("%s: labels of this device's data stop at %d; the run has %d classes", self.device,
                        train.num_classes - 1, classes)
            self.train_set = dataclasses.replace(train, num_classes=classes)
            if self.test_set is not None:
                self.test_set = dataclasses.replace(self.test_set, num_classes=classes)
        return True

    def on_shutdown(self, data: dict) -> None:
        """The end of the run, from the runtime session this device took part in. Any other (a retained one a
        previous run left on the control topic, or one without a session) is stale: the device keeps waiting."""
        session = data.get("session")
        if isinstance(session, str) and session in (self.registered_session, self.done_session):
            if self.cfg.after_run == "wait":  # a service: the runtime's next run (a new instance) finds it here
                logger.info("%s: the run is over (runtime session %s); waiting for the next run (after_run: wait)",
                            self.device, session)
                return
            logger.info("%s: the run is over (runtime session %s)", self.device, session)
            self.stop.set()
        else:
            logger.info("%s: ignoring the end of runtime session %s (this device did not take part in it); "
                        "waiting for a runtime", self.device, str(session)[:40])

    def register(self, session: str | None = None) -> None:
        """Announce this device; repeated for every new runtime session (a runtime that started later
        or restarted has not seen the first registration)."""
        assert self.recipe is not None
        self.registered_session = session
        engine = self.client  # None: onnxruntime, waiting for the edge program (the runtime sends it)
        edge = self.recipe.edge
        self.transport.publish(self.topics.up(self.device), P.control_frame(
            P.REGISTER, run=self.cfg.run_id, device=self.device, round_=self.last_done, session=session,
            profile=self.cfg.profile, model=edge.model, trainer=edge.trainer,
            feature_channels=engine.feature_channels if engine else None,
            num_classes=self.train_set.num_classes, train_samples=len(self.train_set),
            test_samples=len(self.test_set) if self.test_set is not None else 0,
            codec=self.recipe.codec, pid=os.getpid(), algorithm=self.recipe.algorithm, batch_size=edge.batch_size,
            epochs=edge.epochs, input_shape=list(self.train_set.image_shape),
            model_kwargs=edge.model_kwargs, optimizer=edge.optimizer, engine=self.cfg.engine,
            program=self.program_digest, edge_params=engine.trainable_params if engine else None))
        logger.info("%s registered with run %s (%d train samples, engine %s)%s", self.device, self.cfg.run_id,
                    len(self.train_set), self.cfg.engine, f" for runtime session {session}" if session else "")

    def handle(self, topic: str, payload: bytes) -> None:
        """One downlink or control message; never raises (a handler bug costs the message, not the daemon)."""
        try:
            self._handle(topic, payload)
        except Exception:  # the fuzz tests hunt these: each one is a bug
            self.rejected += 1
            self.internal_errors += 1
            logger.exception("%s: internal error handling a message on %s", self.device, topic)

    def _handle(self, topic: str, payload: bytes) -> None:
        if not payload:  # a retained message being deleted (zero-length publish): nothing to handle
            return
        try:
            header, body = P.decode_frame(payload)
        except P.ProtocolError as e:
            self.rejected += 1
            logger.warning("%s: dropped message on %s: %s", self.device, topic, e)
            return
        if header["run"] != self.cfg.run_id:
            self.rejected += 1
            logger.warning("%s: dropped a frame of run %r on %s", self.device, header["run"][:40], topic)
            return
        kind, data = header["type"], header.get("data", {})
        if not isinstance(data, dict):
            self.rejected += 1
            logger.warning("%s: dropped a %s frame whose data is not an object", self.device, kind)
            return
        if kind == P.SHUTDOWN:
            self.on_shutdown(data)
            return
        if kind in (P.HELLO, P.ROUND):
            self.configure(data)  # the first valid recipe builds the model; later ones must agree
        if self.recipe is None:
            return  # nothing to train with yet: the runtime's next HELLO or ROUND carries the recipe
        session = data.get("session")
        if kind in (P.HELLO, P.ROUND) and session and session != self.registered_session:
            self.register(session)
        if kind == P.ROUND:
            problem = round_frame_problem(header)
            if problem:
                self.rejected += 1
                logger.warning("%s: dropped a round announcement: %s", self.device, problem)
                return
            pending = self.pending_round
            if pending is not None and pending["round"] > header["round"] and \
                    (pending.get("data") or {}).get("session") == data.get("session"):
                logger.info("%s: ignoring an announcement of round %d (round %d is announced)", self.device,
                            header["round"], pending["round"])
                return  # an older announcement (redelivered) never displaces the newer one
            self.pending_round = header
        elif kind == P.ACK:
            progress = parse_progress(data)
            if progress is None:
                self.rejected += 1
                logger.warning("%s: dropped a malformed acknowledgement", self.device)
            else:
                self.uplink.on_progress(progress)
        elif kind == P.CHUNK:
            try:
                done = self.reassembler.add(header, body, len(payload))
                if done is not None:
                    self.on_transfer(done)
            except (P.ProtocolError, MessageError, ProgramError, KeyError, ValueError) as e:
                self.rejected += 1
                logger.warning("%s: dropped a downlink transfer: %s", self.device, e)
        elif kind != P.HELLO:
            self.rejected += 1
            logger.warning("%s: dropped a %r frame on %s", self.device, kind[:40], topic)

    def on_transfer(self, done: P.CompletedTransfer) -> None:
        """A completed downlink transfer: a global model, an averaged extractor, soft labels or an edge program.
        Raises ProtocolError / MessageError / ProgramError / KeyError / ValueError with nothing applied."""
        kind = done.meta.get("kind")
        if kind == P.KIND_EDGE_PROGRAM:
            if self.cfg.engine != "onnxruntime":
                raise ProgramError("an edge program for a device on the torch engine")
            if len(done.blob) > MAX_PROGRAM_BYTES:
                raise ProgramError(f"edge program of {len(done.blob)} bytes")
            if self.client is None:
                self.received_program = done.blob  # checked against an announced digest before it runs
                logger.info("%s: edge program received (%.0f KB)", self.device, len(done.blob) / 1024)
                self.try_program()
            return
        if self.client is None:
            raise ProgramError(f"a {str(kind)[:20]} transfer before this device has an engine")
        engine = self.client
        model = engine.model_state()
        # decoded at most what this device's model or samples can need
        limit = (1 << 16) + 2 * (len(self.train_set) * (8 + 4 * self.train_set.num_classes)
                                 if kind == P.KIND_SOFT_LABELS else sum(v.nbytes for v in model.values()))
        if kind == P.KIND_MODEL:
            self.global_state = P.decode_state(P.unpack_arrays(done.blob, limit), {k: v.shape for k, v in model.items()})
            self.global_round = max(self.global_round, done.round)
            logger.info("%s: global model of round %d (%.2f MB)", self.device, done.round, len(done.blob) / 1e6)
        elif kind == P.KIND_EXTRACTOR:
            shapes = {k: v.shape for k, v in engine.extractor_state().items()}
            engine.load_extractor(P.decode_state(P.unpack_arrays(done.blob, limit), shapes))
            logger.info("%s: averaged extractor of round %d loaded", self.device, done.round)
        elif kind == P.KIND_SOFT_LABELS:
            ids, logits = P.soft_labels_from_arrays(P.unpack_arrays(done.blob, limit),
                                                    f"soft labels for {self.device!r} (round {done.round})")
            engine.receive_soft_labels(ids, logits, done.round)
            self.soft_label_round = max(self.soft_label_round, done.round)
            logger.info("%s: soft labels for %d samples (round %d)", self.device, len(ids), done.round)

    # -- rounds -------------------------------------------------------------------------------------

    def _ready(self, header: dict, waited: float) -> bool:
        """Train round r once soft labels of round r-1 are in (or the runtime sent none / we waited enough)."""
        data = header.get("data", {})
        if self.recipe.algorithm == "fedavg":  # every round starts from the global model
            return self.global_round >= header["round"]
        needs = data.get("soft_labels_round")
        if needs is None or self.device not in data.get("soft_labels_to", []) or self.soft_label_round >= needs:
            return True
        return waited > float(data.get("soft_labels_wait_s", 30.0))

    def done_already(self, round_: int, session: str | None) -> bool:
        """True when this runtime session already has this device's upload of ``round_``: it accepted it, or a
        later round's (a session announces rounds in order, so an announcement of an earlier one is a repeat:
        a redelivery, a reconnect's retained copy). Only a new session (a restarted runtime, which lost the
        round in progress) is sent a finished round again."""
        return session == self.done_session and round_ <= self.last_done

    def run_fedavg_round(self, round_: int, session: str | None) -> None:
        """FedAvg: start from the global model, train locally, send the weights back."""
        assert self.global_state is not None
        self.client.load_model_state(self.global_state)
        self.client.reset_optimizer()  # fresh optimizer state
        stats = self.client.train_round(round_)
        self.step_times.append(stats.seconds / max(1, -(-stats.samples // self.recipe.edge.batch_size)))
        logger.info("%s fedavg round %d: loss %.3f acc %.3f, %d samples at %.0f/s", self.device, round_, stats.loss,
                    stats.train_accuracy, stats.samples, stats.samples_per_s)
        arrays, meta = P.encode_state(self.client.model_state(), self.recipe.model_codec)
        meta.update(kind=P.KIND_MODEL_UPDATE, samples=len(self.client.train_set),
                    metrics={"train_loss": stats.loss, "train_accuracy": stats.train_accuracy,
                             "train_seconds": stats.seconds, "samples_per_s": stats.samples_per_s})
        if not self.send_transfer(P.pack_arrays(arrays), round_, meta, "model update", session):
            return  # stopped, a new runtime session, or rejected: the round is not done
        self.trained_round = self.last_done = round_
        self.done_session = session
        self.save_state()

    def use_threads(self) -> None:
        """Set the engine's threads for this device's compute (one pool may be shared in memory mode)."""
        if self.client is not None:
            self.client.set_threads()

    def run_round(self, header: dict) -> None:
        self.use_threads()
        round_, data = header["round"], header.get("data", {})
        session = data.get("session")
        if self.done_already(round_, session):
            if round_ < self.last_done:
                logger.info("%s: ignoring an announcement of round %d: round %d is done", self.device, round_,
                            self.last_done)
            return  # already uploaded to this runtime session
        if self.recipe.algorithm == "fedavg":
            self.run_fedavg_round(round_, session)
            return
        if round_ > self.trained_round:
            stats = self.client.train_round(round_)
            self.trained_round = round_
            self.save_state()  # a crash during the upload resends without retraining
            self.step_times.append(stats.seconds / max(1, -(-stats.samples // self.recipe.edge.batch_size)))
            logger.info("%s round %d: loss %.3f (ce %.3f kd %.3f) acc %.3f, %d samples at %.0f/s",
                        self.device, round_, stats.loss, stats.ce, stats.kd, stats.train_accuracy, stats.samples,
                        stats.samples_per_s)
            metrics = {"train_loss": stats.loss, "train_accuracy": stats.train_accuracy,
                       "train_seconds": stats.seconds, "samples_per_s": stats.samples_per_s,
                       "kd_coverage": stats.kd_coverage}
        else:  # trained already (we or the runtime restarted before the upload landed): resend only
            logger.info("%s: re-sending round %d without retraining", self.device, round_)
            metrics = {"resent": True}
        # test first: the train upload is what lets the runtime move on (async: at once), and a transfer is sent
        # only after the previous one's verdict
        splits = (["test"] if data.get("eval") and self.client.test_set is not None else []) + ["train"]
        if self.accepted["session"] == session and self.accepted["round"] == round_:
            splits = [s for s in splits if s not in self.accepted["splits"]]  # the runtime has those
        else:
            self.accepted = {"session": session, "round": round_, "splits": []}
        share_extractor = bool(data.get("average_extractors"))
        for split in splits:
            upload = self.client.extract(split, round_)
            upload.round, upload.metrics = round_, (metrics if split == "train" else {})
            sent = self.send_upload(upload, self.client.extractor_state() if share_extractor and split == "train"
                                    else None, session)
            upload = None  # one split's features in memory at a time (a small device's peak)
            if not sent:
                return  # stopped, a new runtime session, or rejected: the round is not done (a later ROUND resends)
            self.accepted["splits"].append(split)
            if split != splits[-1]:
                self.save_state()  # a restart before the round is done re-sends only what the runtime lacks
        self.last_done, self.done_session = round_, session
        self.save_state()

    def send_upload(self, upload, extractor: dict | None = None, session: str | None = None) -> bool:
        """Encode one split's features and send them until the runtime's verdict (see :meth:`send_transfer`)."""
        arrays, meta = P.encode_upload(upload, self.recipe.codec)
        split, samples, round_ = upload.split, len(upload.sample_ids), upload.round
        upload.features = upload.logits = None  # encoded: the float copies go before the (long) send
        if extractor is not None:  # the runtime averages extractors across devices
            ext_arrays, _ = P.encode_state(extractor, "fp32")
            arrays.update({P.EXTRACTOR_PREFIX + k: v for k, v in ext_arrays.items()})
        blob = P.pack_arrays(arrays)
        arrays = None
        done = self.send_transfer(blob, round_, meta, f"{split} features", session)
        if done:
            logger.info("%s: %s of %d samples done: %d bytes on the wire (%.1fx smaller than fp32)", self.device,
                        split, samples, self.uplink.last_transfer_wire,
                        meta["raw_fp32_bytes"] / max(self.uplink.last_transfer_bytes, 1))
        return done

    def send_transfer(self, blob: bytes, round_: int, meta: dict, what: str, session: str | None) -> bool:
        """Send on the uplink until the runtime's verdict (:meth:`Uplink.send`). True when the runtime accepted it,
        or refused it as ``stale_round`` (it has moved past this round: nothing left to do). False when the agent
        stops, a new runtime session starts first, or the runtime rejected it: the round is then not done."""
        verdict = self.uplink.send(blob, round_, meta, what, poll=self._poll, abort=lambda: self.stop.is_set() or (
            session is not None and self.registered_session != session))
        if verdict is None:
            logger.warning("%s: round %d %s not finished (%s)", self.device, round_, what,
                           "stopping" if self.stop.is_set() else "a new runtime session started")
            return False
        return verdict.accepted or verdict.reason == "stale_round"

    def _poll(self, timeout: float) -> None:
        """While a transfer is in flight: handle incoming messages (its acknowledgements) and keep heartbeating."""
        self.pump(timeout)
        self.heartbeat()

    def heartbeat(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.client is None:  # not registered yet: the runtime would refuse a heartbeat
            return
        if not force and now - self._last_heartbeat < self.cfg.heartbeat_s:
            return
        self._last_heartbeat = now
        self.transport.publish(self.topics.heartbeat(self.device), P.control_frame(
            P.HEARTBEAT, run=self.cfg.run_id, device=self.device, round_=self.last_done, profile=self.cfg.profile,
            step_time_s=float(np.median(self.step_times)) if self.step_times else None,
            rss_mb=peak_rss_mb(),
            engine=self.cfg.engine,
            bytes_up=self.uplink.bytes_up, bytes_resent=self.uplink.bytes_resent, rejected=self.rejected), qos=0)

    def pump(self, timeout: float = 0.2) -> bool:
        """Handle every queued message (waiting up to ``timeout`` s for the first); True if any came."""
        handled = drain(self.inbox, self.handle, timeout)
        for _, transfer in self.reassembler.expire():
            logger.warning("%s: downlink transfer %s expired incomplete", self.device, transfer[:8])
        return handled > 0

    def refuse_program(self, digest: str, why: str) -> None:
        """Never run ``digest`` again in this run: drop it from the cache and the engine built from it, and
        tell the runtime this device has no program (it keeps waiting for a good one, never crashes)."""
        self.rejected += 1
        self.refused_programs.add(digest)
        self.announced_programs = [d for d in self.announced_programs if d != digest]
        logger.error("%s: edge program %s refused: %s", self.device, digest[:12], why)
        try:
            self.programs.path(digest).unlink(missing_ok=True)
        except (OSError, ProgramError):
            pass
        if self.program_digest == digest:
            self.client = self.program_digest = None
            if self.registered_session is not None:
                self.register(self.registered_session)

    def request_program(self) -> None:
        """onnxruntime without an engine: a program transfer may have been lost (a broker restart, an expired
        transfer); registering again (with no program named) makes the runtime send it again, with backoff."""
        if self.cfg.engine != "onnxruntime" or self.client is not None or self.registered_session is None:
            return
        last, wait = self._program_request
        now = time.monotonic()
        if not last:
            self._program_request = (now, wait)
        elif now - last > wait:
            logger.info("%s: still no edge program after %.0f s: registering again", self.device, now - last)
            self._program_request = (now, min(2 * wait, PROGRAM_REQUEST_S[1]))
            self.register(self.registered_session)

    def serve(self) -> int:
        """Main loop until SHUTDOWN or SIGTERM."""
        waiting_since = None
        while not self.stop.is_set():
            if self.pump():
                continue  # drain the inbox before starting work
            self.heartbeat()
            self.request_program()
            if self.pending_round is not None and self.client is not None:
                waiting_since = waiting_since or time.monotonic()
                if self._ready(self.pending_round, time.monotonic() - waiting_since):
                    header, self.pending_round, waiting_since = self.pending_round, None, None
                    try:
                        self.run_round(header)
                    except Exception as e:
                        if self.program_digest is None:
                            raise  # the torch engine: a bug here is the agent's own (exit 1, the supervisor restarts)
                        # onnxruntime: the program the runtime sent broke the round: refuse it, keep serving
                        self.refuse_program(self.program_digest, f"a round failed in it: {type(e).__name__}: "
                                                                 f"{str(e)[:300]}")
                        self.pending_round = self.pending_round or header
                    self.heartbeat(force=True)
        self.save_state()
        return self.exit_code

    def shutdown(self) -> None:
        if not self.transport.connected:  # stopped before the broker was ever reached
            self.transport.close()
            return
        try:
            self.transport.publish(self.topics.status(self.device), P.control_frame(
                P.STATUS, run=self.cfg.run_id, device=self.device, round_=self.last_done, online=False), retain=True)
            self.transport.flush(5)
        finally:
            self.transport.close()


def _accepted_mark(raw) -> dict:
    """The saved ``accepted`` mark (JSON), checked field by field; an unreadable one is an empty mark (the
    device then re-sends splits the runtime may already hold: costs bytes, never data)."""
    empty = {"session": None, "round": -1, "splits": []}
    try:
        mark = json.loads(raw) if isinstance(raw, str) else None
    except ValueError:
        return empty
    if not isinstance(mark, dict) or not isinstance(mark.get("session"), (str, type(None))) \
            or type(mark.get("round")) is not int or not isinstance(mark.get("splits"), list) \
            or not all(s in ("train", "test") for s in mark["splits"]):
        return empty
    return {"session": mark["session"], "round": mark["round"], "splits": list(mark["splits"])}


def build_agent(cfg: AgentConfig, transport: Transport | None = None) -> EdgeAgent:
    """An agent for ``cfg`` with its local data loaded; its model is built when the runtime's recipe arrives.
    Raises DatasetError (data) or ConnectionError (broker, on ``start``)."""
    old = Path(cfg.state_dir) / OLD_STATE_FILE
    if old.exists() and not (Path(cfg.state_dir) / STATE_FILE).exists():
        logger.warning("%s: a state file of an earlier version (torch.save) is not read; this device starts its "
                       "progress afresh (delete the file to silence this)", old)
    train, test = load_local_data(cfg.data)
    if not len(train):
        raise DatasetError(f"{cfg.data.path or cfg.data.dataset}: this device has no training samples")
    about = describe_data(cfg.data, train, test)
    logger.info("%s data: %s at %s: %d train / %d test samples of %s, %d classes, fingerprint %s", cfg.device_id,
                about["dataset"], about["path"] or "its default place", about["train_samples"], about["test_samples"],
                "x".join(map(str, about["image_shape"])), about["num_classes"], about["fingerprint"])
    check_state_identity(Path(cfg.state_dir) / STATE_FILE, device=cfg.device_id, run=cfg.run_id,
                         data=about["fingerprint"])
    if transport is None:
        offline = P.control_frame(P.STATUS, run=cfg.run_id, device=cfg.device_id, round_=-1, online=False)
        transport = create_transport(cfg.broker, f"edgefl-{cfg.run_id}-{cfg.device_id}",
                                     will=(P.Topics(cfg.run_id).status(cfg.device_id), offline))
    return EdgeAgent(cfg, transport, train, test, about["fingerprint"])
