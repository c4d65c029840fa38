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

import json
import logging
import os
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from edge_sdk import wire as P
from edge_sdk.config import AgentConfig, RunRecipe, recipe_from_frame
from edge_sdk.engine import EdgeEngine
from edge_sdk.downlink import Downlink, Dropped, decode_transfer
from edge_sdk.engines import engine_class
from edge_sdk.program.delivery import ProgramInbox, check_program_size
from edge_sdk.program.format import ProgramError
from edge_sdk.rounds import RoundRunner
from edge_sdk.state import STATE_FILE, AgentStateFile, RoundProgress, check_state_identity
from edge_sdk.uplink import Uplink
from edge_sdk.wire import round_frame_problem
from edgefl_core.config import ConfigError
from edgefl_core.data.datasets import DatasetError, ImageDataset, dataset_stats
from edgefl_core.data.local import data_fingerprint, describe_data, fit_to_run, load_local_data
from edgefl_core.proc import peak_rss_mb
from edgefl_core.reliable import parse_progress
from edgefl_core.transport import Transport, create_transport
from edgefl_core.transport.retry import connect_patiently
from edgefl_core.transport.inbox import Inbox, drain

logger = logging.getLogger("edgefl.agent")



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
        self.inbox = Inbox()
        self.downlink = Downlink(cfg.run_id, cfg.device_id)  # frames checked, transfers reassembled
        self.state = AgentStateFile(Path(cfg.state_dir) / STATE_FILE, device=self.device, run=cfg.run_id,
                                    data=fingerprint or data_fingerprint(train, test))  # build_agent has it already
        self.rounds = RoundRunner(self.device, send=lambda *a: self.send_transfer(*a), save=lambda: self.save_state(),
                                  progress=RoundProgress(done_session=self.state.saved_session()),
                                  state_dir=cfg.state_dir)
        self.run_instance: str | None = None  # the runtime's run instance (HELLO / ROUND): a new one is a new run
        self.pending_round: dict | None = None
        self.uplink = Uplink(transport, self.topics, self.device, cfg.upload)  # acknowledged transfers
        self.registered_session: str | None = None
        self.programs = ProgramInbox(Path(cfg.state_dir) / "programs", self.device)  # onnxruntime: the edge programs
        self.run_seed: int | None = None  # the runtime's seed of the initial edge model (run_facts)
        self.stop = threading.Event()
        self.rejected = 0
        self.internal_errors = 0
        self.exit_code = 0   # 2: stopped because this device cannot take part as configured
        self._last_heartbeat = 0.0

    @property
    def progress(self) -> RoundProgress:
        return self.rounds.progress

    # -- persistence ---------------------------------------------------------------------------------

    def save_state(self) -> None:
        if self.client is not None:
            self.state.save(self.client, self.progress, recipe=self._recipe_json(), instance=self.run_instance,
                            program=self.programs.current)

    def load_state(self) -> bool:
        """Resume from the saved state when it is this device's, run's and recipe's and fits the current data
        (:meth:`~edge_sdk.state.AgentStateFile.resume`); otherwise start fresh, never crash."""
        progress = self.state.resume(self.client, recipe=self._recipe_json(), instance=self.run_instance)
        if progress is not None:
            self.rounds.progress = progress
        return progress is not None

    def _recipe_json(self) -> str:
        return json.dumps(asdict(self.recipe), sort_keys=True)

    # -- network (callbacks run on the network thread: enqueue only) --------------------------------

    def enqueue(self, topic: str, payload: bytes) -> None:
        self.inbox.put(topic, payload)

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
        try:  # onnxruntime: the compiled program is the code, model and trainer names are not the device's to check
            recipe = recipe_from_frame(data, self.device, check_code=self.cfg.engine == "torch")
        except ConfigError as e:
            logger.error("%s: the runtime's run recipe is not usable here: %s", self.device, e)
            return False
        if recipe is None:
            return False
        self.uplink.use_shards(data.get("ingest_shards"))  # every frame: a restarted runtime may have another count
        instance = data.get("instance") if isinstance(data.get("instance"), str) else None
        if self.recipe is not None and instance and self.run_instance and instance != self.run_instance:
            logger.warning("%s: the runtime started run %s afresh (instance %s, was %s): this device starts it "
                           "afresh too", self.device, self.cfg.run_id, instance[:16], self.run_instance[:16])
            self.client = self.recipe = self.pending_round = None
            self.rounds.reset()
            self.programs.reset()  # the new instance announces its own programs
        self.run_instance = instance or self.run_instance
        self.programs.note(data.get("edge_programs"))
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
        try:  # (build_agent checked that torch is installed)
            client = engine_class("torch")(self.device, edge, self.train_set, self.test_set, seed=self.cfg.seed,
                                           stats_name=self._stats_name(), threads=self.cfg.threads,
                                           init_seed=self.run_seed)
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

    def try_program(self) -> bool:
        """onnxruntime: build the engine from an announced program (received, or cached from an earlier
        transfer or ``edge-agent program install``) that is this recipe's. True once the engine is built."""
        if self.cfg.engine != "onnxruntime" or self.client is not None or self.recipe is None:
            return self.client is not None
        refusals = self.programs.refusals
        self.client = self.programs.build(asdict(self.recipe.edge), lambda program: engine_class("onnxruntime")(
            self.device, program, self.train_set, self.test_set, stats_name=self._stats_name(), seed=self.cfg.seed,
            threads=self.cfg.threads))
        self.rejected += self.programs.refusals - refusals
        if self.client is None:
            return False
        self.load_state()
        if self.registered_session is not None:  # tell the runtime what this device now runs
            self.register(self.registered_session)
        return True

    def refuse_program(self, digest: str, why: str) -> None:
        """Never run ``digest`` again in this run: drop it (cache included) and the engine built from it, and
        tell the runtime this device has no program (it keeps waiting for a good one, never crashes)."""
        self.rejected += 1
        if self.programs.refuse(digest, why):
            self.client = None
            if self.registered_session is not None:
                self.register(self.registered_session)

    def request_program(self) -> None:
        """onnxruntime without an engine: a program transfer may have been lost (a broker restart, an expired
        transfer); registering again (with no program named) makes the runtime send it again, with backoff."""
        if self.cfg.engine == "onnxruntime" and self.client is None and self.registered_session is not None \
                and self.programs.request_due():
            logger.info("%s: still no edge program: registering again", self.device)
            self.register(self.registered_session)

    def fit_run_facts(self, facts) -> bool:
        """Check this device's data against the run's classes and image shape (``run_facts``, sent with the
        recipe; :func:`~edgefl_core.data.local.fit_to_run`). Data that cannot take part: say so and stop with
        exit status 2 (a configuration error)."""
        if not isinstance(facts, dict):
            return True  # a runtime that does not state them judges the registration itself
        seed = facts.get("seed")
        self.run_seed = seed if type(seed) is int and 0 <= seed < 2**32 else None
        try:
            self.train_set, self.test_set = fit_to_run(self.train_set, self.test_set, facts.get("num_classes"),
                                                       facts.get("input_shape"))
        except DatasetError as e:
            logger.error("%s: %s. Point data at images the run can use (edge-agent data check; docs/DEPLOYMENT.md, "
                         "'A device's own data')", self.device, e)
            self.exit_code = 2
            self.stop.set()
            return False
        return True

    def on_shutdown(self, data: dict) -> None:
        """The end of the run, from the runtime session this device took part in. Any other (a retained one a
        previous run left on the control topic, or one without a session) is stale: the device keeps waiting."""
        session = data.get("session")
        if isinstance(session, str) and session in (self.registered_session, self.progress.done_session):
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
            P.REGISTER, run=self.cfg.run_id, device=self.device, round_=self.progress.last_done, session=session,
            profile=self.cfg.profile, model=edge.model, trainer=edge.trainer,
            feature_channels=engine.feature_channels if engine else None,
            num_classes=self.train_set.num_classes, train_samples=len(self.train_set),
            test_samples=len(self.test_set) if self.test_set is not None else 0,
            codec=self.recipe.codec, pid=os.getpid(), algorithm=self.recipe.algorithm, batch_size=edge.batch_size,
            epochs=edge.epochs, input_shape=list(self.train_set.image_shape),
            model_kwargs=edge.model_kwargs, optimizer=edge.optimizer, engine=self.cfg.engine,
            program=self.programs.current, edge_params=engine.trainable_params if engine else None))
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
        try:
            got = self.downlink.frame(payload)
            if got is None:
                return  # a retained message being deleted (zero-length publish): nothing to handle
            kind, header, data, body = got
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
                self.on_round(header, data)
            elif kind == P.ACK:
                progress = parse_progress(data)
                if progress is None:
                    raise Dropped("a malformed acknowledgement")
                self.uplink.on_progress(progress)
            elif kind == P.CHUNK:
                done = self.downlink.chunk(header, body, len(payload))
                if done is not None:
                    self.on_transfer(done)
            elif kind != P.HELLO:
                raise Dropped(f"a {kind[:40]!r} frame")
        except (Dropped, ProgramError) as e:
            self.rejected += 1
            logger.warning("%s: dropped a message on %s: %s", self.device, topic, e)

    def on_round(self, header: dict, data: dict) -> None:
        """A round announcement becomes the pending round, unless it is malformed or older than the pending one
        of the same session (a redelivery never displaces the newer announcement)."""
        problem = round_frame_problem(header)
        if problem:
            raise Dropped(f"a round announcement: {problem}")
        pending = self.pending_round
        if pending is not None and pending["round"] > header["round"] and \
                (pending.get("data") or {}).get("session") == data.get("session"):
            logger.info("%s: ignoring an announcement of round %d (round %d is announced)", self.device,
                        header["round"], pending["round"])
            return
        self.pending_round = header

    def on_transfer(self, done: P.CompletedTransfer) -> None:
        """A completed downlink transfer: a global model, an averaged extractor, soft labels or an edge program.
        Raises Dropped / ProgramError with nothing applied."""
        kind = done.meta.get("kind")
        if kind == P.KIND_EDGE_PROGRAM:
            if self.cfg.engine != "onnxruntime":
                raise ProgramError("an edge program for a device on the torch engine")
            check_program_size(done.blob)
            if self.client is None:
                self.programs.receive(done.blob)  # checked against an announced digest before it runs
                logger.info("%s: edge program received (%.0f KB)", self.device, len(done.blob) / 1024)
                self.try_program()
            return
        engine = self.client
        if engine is None:
            raise ProgramError(f"a {str(kind)[:20]} transfer before this device has an engine")
        part = engine.extractor_state() if kind == P.KIND_EXTRACTOR else engine.model_state()
        payload = decode_transfer(done, {k: v.shape for k, v in part.items()}, len(self.train_set),
                                  self.train_set.num_classes)
        try:  # soft labels for ids this device does not hold, of another class count, ...: nothing applied
            self.rounds.take(engine, kind, payload, done.round)
        except (KeyError, ValueError) as e:
            raise Dropped(f"a {kind} transfer: {type(e).__name__}: {e}") from None

    # -- rounds -------------------------------------------------------------------------------------

    def run_round(self, header: dict) -> None:
        """One announced round (:meth:`RoundRunner.run`) on this device's engine and recipe."""
        self.client.set_threads()  # this device's threads (in memory mode one pool serves several agents)
        self.rounds.run(self.client, self.recipe, header)

    def send_transfer(self, blob: bytes, round_: int, meta: dict, what: str, session: str | None) -> bool:
        """Send on the uplink until the runtime's verdict (:meth:`Uplink.send`). True when the runtime accepted it,
        or refused it as ``stale_round`` (it has moved past this round: nothing left to do). False when the agent
        stops, a new runtime session starts first, or the runtime rejected it: the round is then not done."""
        verdict = self.uplink.send(blob, round_, meta, what, poll=self.poll_during_transfer,
                                   abort=lambda: self.stop.is_set() or (session is not None
                                                                       and self.registered_session != session))
        if verdict is None:
            logger.warning("%s: round %d %s not finished (%s)", self.device, round_, what,
                           "stopping" if self.stop.is_set() else "a new runtime session started")
            return False
        return verdict.accepted or verdict.reason == "stale_round"

    def poll_during_transfer(self, timeout: float) -> None:
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
            P.HEARTBEAT, run=self.cfg.run_id, device=self.device, round_=self.progress.last_done,
            profile=self.cfg.profile, rss_mb=peak_rss_mb(), engine=self.cfg.engine,
            step_time_s=float(np.median(self.rounds.step_times)) if self.rounds.step_times else None,
            bytes_up=self.uplink.bytes_up, bytes_resent=self.uplink.bytes_resent, rejected=self.rejected), qos=0)

    def pump(self, timeout: float = 0.2) -> bool:
        """Handle queued messages (waiting up to ``timeout`` s for the first, handling for at most
        :data:`~edgefl_core.transport.inbox.DRAIN_BUDGET_S` s); True if any came."""
        handled = drain(self.inbox, self.handle, timeout)
        self.downlink.expire()
        if self.transport.taken_over and not self.stop.is_set():
            logger.error("%s: another process connected as this device (same client id) and took over its broker "
                         "session: stopping without saving state (it belongs to that process now; run one agent "
                         "per device)", self.device)
            self.exit_code = 2
            self.stop.set()
        return handled > 0

    def serve(self) -> int:
        """Main loop until SHUTDOWN or SIGTERM."""
        waiting_since = None
        while not self.stop.is_set():
            busy = self.pump()
            self.heartbeat()  # even while messages keep coming: a steady stream must not silence the device
            if busy:
                continue  # drain the inbox before starting work
            self.request_program()
            if self.pending_round is not None and self.client is not None:
                waiting_since = waiting_since or time.monotonic()
                if self.rounds.ready(self.recipe, self.pending_round, time.monotonic() - waiting_since):
                    header, self.pending_round, waiting_since = self.pending_round, None, None
                    try:
                        self.run_round(header)
                    except Exception as e:
                        if self.programs.current is None:
                            raise  # the torch engine: a bug here is the agent's own (exit 1, the supervisor restarts)
                        # onnxruntime: the program the runtime sent broke the round: refuse it, keep serving
                        self.refuse_program(self.programs.current, f"a round failed in it: {type(e).__name__}: "
                                                                 f"{str(e)[:300]}")
                        self.pending_round = self.pending_round or header
                    self.heartbeat(force=True)
        if not self.transport.taken_over:
            self.save_state()
        return self.exit_code

    def shutdown(self) -> None:
        if not self.transport.connected:  # stopped before the broker was ever reached
            self.transport.close()
            return
        try:
            self.transport.publish(self.topics.status(self.device), P.control_frame(
                P.STATUS, run=self.cfg.run_id, device=self.device, round_=self.progress.last_done, online=False),
                retain=True)
            self.transport.flush(5)
        finally:
            self.transport.close()


def build_agent(cfg: AgentConfig, transport: Transport | None = None) -> EdgeAgent:
    """An agent for ``cfg`` with its local data loaded; its model is built when the runtime's recipe arrives.
    Raises DatasetError (data), ConfigError (engine: torch without torch) or ConnectionError (broker, on ``start``)."""
    if cfg.engine == "torch":
        try:
            engine_class("torch")
        except ImportError as e:  # a device installed without torch (the base install is onnxruntime's)
            raise ConfigError(f"engine: torch needs torch ({e}): install it (pip install torch==2.13.0, then this "
                              "package with its torch extra) or set engine: onnxruntime") from None
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
