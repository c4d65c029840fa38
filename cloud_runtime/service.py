"""The cloud runtime: wires the registry, ingest, durable store, report and one strategy to a transport.

Network callbacks only enqueue (:meth:`CloudRuntime.enqueue`); decoding, training and publishing happen
on the thread that calls :meth:`CloudRuntime.serve`. Every message is charged to the device the broker
authenticated (its topic); a rejected message is counted with its reason and has no other effect.
On restart the runtime resumes from its last committed checkpoint (``store.py``).
"""
from __future__ import annotations

import logging
import threading
import time
import uuid
from dataclasses import asdict

import torch

from cloud_runtime.config import RuntimeConfig, check_server_ranks
from cloud_runtime.console.views import StatusBoard
from cloud_runtime.downlink import Downlink
from cloud_runtime.edge_programs import EdgePrograms
from cloud_runtime.ingest import Ingest
from cloud_runtime.plots import plot_accuracy, write_json
from cloud_runtime.privacy import run_privacy
from cloud_runtime.progress import Interrupted
from cloud_runtime.registry import DeviceRegistry, Rejected, device_facts
from cloud_runtime.report import CostEstimator, build_report
from cloud_runtime.shards import Shards
from cloud_runtime.store import CheckpointError, DurableStore, identity_problem, run_definition  # noqa: F401
from cloud_runtime.strategies import STRATEGIES, RunContext, Strategy, strategy_name
from cloud_runtime.telemetry import Telemetry
from edge_sdk import protocol as P
from edge_sdk.messages import MessageError
from edgefl_core.transport import Transport, create_transport
from edgefl_core.transport.inbox import Inbox, drain
from edgefl_core.transport.retry import connect_patiently

logger = logging.getLogger("edgefl.runtime")


# what one device's earlier runtime session can have left in flight (a whole upload's chunks and heartbeats)
LATE_MESSAGES_PER_DEVICE = 2048


class CloudRuntime:
    def __init__(self, cfg: RuntimeConfig, transport: Transport, group=None):
        self.cfg = cfg
        self.transport = transport
        self.topics = P.Topics(cfg.run_id)
        self.session = uuid.uuid4().hex[:12]  # changes on every (re)start: devices re-send lost uploads
        # each device's queued messages are bounded: the serve thread may train for minutes meanwhile
        self.inbox = Inbox(self._sender, cfg.max_pending_bytes_per_device)
        self.stop = threading.Event()
        self.messages_in = 0
        self.empty_messages = 0   # zero-length messages (retained deletions): ignored
        # device -> the earlier runtime session its last registration answered (delivered late: see register());
        # until it registers for this session, what it sent after that registration belongs to that session too
        self.late_sessions: dict[str, str] = {}
        self.late_counts: dict[str, int] = {}   # late messages ignored per device (bounded: a forged session buys little)
        self.late_messages = 0    # ignored: registrations, uploads and heartbeats of a device for an earlier session
        self.started = time.time()
        self.telemetry, self.board = Telemetry(), StatusBoard(cfg.console.refresh_s)  # the operator's console
        self.console_info: dict | None = None  # where it serves (cloud_runtime.console.start_console)
        self.telemetry.on_phase = lambda: self.board.refresh(self, force=True)  # the fleet as each phase begins
        self.registry = DeviceRegistry(cfg, self.telemetry)
        self.ingest = Ingest(cfg, self.registry)
        self.store = DurableStore(cfg.state_dir)
        # each device's recipe, built and validated once (devices without an override share the run's)
        self.recipes = {None: cfg.recipe_for(), **{d: cfg.recipe_for(d) for d in cfg.edge_overrides}}
        recipe = {"recipe": asdict(self.recipes[None]), "edge_overrides": cfg.edge_overrides}
        self.downlink = Downlink(transport, self.topics, self.session, self.registry, self.ingest, recipe)
        self.strategy: Strategy = STRATEGIES.get(strategy_name(cfg))(RunContext(
            cfg, self.registry, self.ingest, self.downlink, self.store, self.stop, self.pump, self.checkpoint,
            cfg.threads or torch.get_num_threads(), group))
        self.group = group  # the coordinator of a torchrun launch: server training on every rank
        self.programs = EdgePrograms(cfg.state_dir, self.recipes, self.downlink, lambda: self.strategy.next_round,
                                     self.session, cfg.seed)  # compiled graphs for devices on onnxruntime
        if cfg.num_classes and cfg.input_shape:  # programs built ahead (program build) are announced at once
            self.programs.announce_cached(cfg.num_classes, cfg.input_shape)
        self.costs = CostEstimator()  # the report's and the console's (models' FLOPs counted once)
        self.checkpoint_error: dict | None = None   # the last failed commit (None once one succeeds again)
        # what this state belongs to: the run id, what defines the run, and this run's instance (new when a
        # run starts from empty state, kept across restarts: devices discard progress of another instance)
        self.identity = {"run_id": cfg.run_id, "definition": run_definition(cfg), "instance": uuid.uuid4().hex[:12]}
        self.downlink.recipe["instance"] = self.identity["instance"]
        # the run's data facts ride with the recipe: a device checks its data against them before registering
        # (and a device that lacks the top classes takes the run's class count)
        # and the seed of the initial edge model: every device starts from the same one, whichever its engine
        self.downlink.recipe["run_facts"] = {"num_classes": cfg.num_classes, "input_shape": cfg.input_shape,
                                             "seed": cfg.seed}
        # sharded ingest: devices send their chunks to their worker's shard (ingest_worker.py); judged here
        self.shards = Shards(cfg, transport, self.topics, self.registry, self.ingest, self._judge, self._late,
                             lambda device, meta: self.strategy.decoded_limit(device, meta),
                             self._count_message) if cfg.ingest.workers else None
        if self.shards:
            self.downlink.recipe["ingest_shards"] = self.shards.workers

    # -- messages -----------------------------------------------------------------------------------

    def _sender(self, topic: str, payload: bytes) -> str | None:
        """Whose bound a queued message counts toward: the device of a device topic, or the device an ingest
        worker's forward or charge is about (a device's data reaches the runtime that way too, inflated up to
        its decoded limit); None for a worker's presence."""
        device = self.topics.device_of(topic)
        if device is None and self.topics.ingest_shard_of(topic) is not None:
            device = P.frame_device(payload)
        return device

    def enqueue(self, topic: str, payload: bytes) -> None:
        """Transport callback: queue only (runs on the network thread)."""
        self.inbox.put(topic, payload)

    def start(self) -> None:
        # uplinks and heartbeats mean something only live: a retained frame there (a device may publish one
        # on its own topics) would act again at every restart, so it is ignored and cleared; status is
        # retained by design (the Last Will)
        self.transport.subscribe(self.topics.all_up, self.enqueue, retained=False)
        self.transport.subscribe(self.topics.all_heartbeat, self.enqueue, retained=False)
        self.transport.subscribe(self.topics.all_status, self.enqueue)
        if self.shards:
            self.shards.subscribe(self.enqueue)
        if not connect_patiently(self.transport, self.stop, f"runtime of run {self.cfg.run_id!r}"):
            return  # stopped while waiting for the broker
        if self.strategy.next_round < self.cfg.rounds:  # devices that registered before we listened do so again
            self.downlink.broadcast(P.HELLO, self.strategy.next_round, session=self.session)
        logger.info("runtime (session %s, %s) serving run %r", self.session, strategy_name(self.cfg), self.cfg.run_id)
        if self.cfg.num_classes is None or self.cfg.input_shape is None:
            logger.warning("num_classes / input_shape are not configured: the first registration (and upload) fixes "
                           "the run's classes and shapes; set both in the runtime config (provision writes them)")

    def pump(self, timeout: float = 0.2) -> float:
        """Handle what is queued (waiting up to ``timeout`` s for the first message; at most
        :data:`~edgefl_core.transport.inbox.DRAIN_BUDGET_S` s of it, so a backlog never starves what follows);
        check the ingest workers' presence; expire transfers. Returns the ``time.monotonic()`` up to which every
        message that arrived has been handled (:meth:`Inbox.handled_up_to`): deadlines, silences and expiries
        are judged at that time, so a message still queued behind a backlog counts as come."""
        drain(self.inbox, self.handle, timeout)
        handled_to = self.inbox.handled_up_to()
        for device, (messages, wire) in self.inbox.take_dropped().items():  # (not an offence: see Inbox)
            self.ingest.count("rejected", device, wire)
            self.registry.reject("inbox_full", device, f"{messages} messages ({wire} bytes) dropped unread: the "
                                 f"runtime held max_pending_bytes_per_device of this device's messages unhandled")
        if self.transport.taken_over and not self.stop.is_set():
            logger.error("another process logged in with this runtime's client id and took over its broker session "
                         "(a second runtime of run %r?): stopping without writing state, which is that process's "
                         "now (run one runtime per run)", self.cfg.run_id)
            self.stop.set()
        if self.shards:
            self.shards.check_presence(handled_to)
        self.programs.poll()
        self.board.refresh(self)  # the console's views, when due and someone is watching
        for device, transfer in self.ingest.expired(handled_to):
            self.registry.reject("transfer_timeout", device, f"transfer {transfer[:8]} incomplete after "
                                                             f"{self.cfg.transfer_timeout_s:.0f}s")
        return handled_to

    def handle(self, topic: str, payload: bytes) -> None:
        """One message; never raises. Rejections are charged to the topic's (authenticated) device."""
        if self.shards and self.shards.handle(topic, payload):
            return
        self._count_message()
        device = self.topics.device_of(topic)
        if not payload:  # a zero-length publish deletes a retained message (MQTT 3.3.1.3): nothing to handle and
            # nothing to charge (the runtime's own clearing of a retained uplink frame comes back as one)
            self.empty_messages += 1
            return
        chunk_wire = 0  # a chunk refused before the ingest has seen it: its bytes count as rejected
        try:
            header, body = P.decode_frame(payload, max_body=self.cfg.max_chunk_bytes)
            if header["type"] == P.CHUNK and topic.endswith("/up"):
                chunk_wire = len(payload)
            if header["run"] != self.cfg.run_id:
                raise Rejected("wrong_run", f"run {header['run']!r}")
            if device is None or header["device"] != device:
                raise Rejected("spoofed_device", f"{header['device']!r} published on {topic}")
            if self.registry.quarantined(device) and not topic.endswith("/status"):
                until = time.ctime(self.registry.devices[device]["quarantined_until"])
                raise Rejected("quarantined", f"ignored until {until}")
            data = header.get("data", {})
            if not isinstance(data, dict):
                raise Rejected("bad_payload", f"data must be an object, got {type(data).__name__}")
            if topic.endswith("/status"):
                if header["type"] != P.STATUS:
                    raise Rejected("bad_type", f"{header['type'][:40]!r} on a status topic")
                self.registry.on_status(device, data)
            elif topic.endswith("/hb"):
                if header["type"] != P.HEARTBEAT:
                    raise Rejected("bad_type", f"{header['type'][:40]!r} on a heartbeat topic")
                if not self._late(device, "heartbeat"):
                    self.registry.on_heartbeat(device, data)
            elif header["type"] == P.REGISTER:
                self.register(device, data)
            elif header["type"] == P.CHUNK:
                if not self._late(device, "upload chunk"):
                    chunk_wire = 0  # from here the ingest counts it
                    self._on_chunk(device, header, body, len(payload))
            else:
                raise Rejected("bad_type", f"unexpected {header['type']!r} on {topic}")
        except Rejected as e:
            self._reject(e.reason, device, e.detail, chunk_wire)
        except P.ProtocolError as e:
            self._reject(e.reason, device, str(e), chunk_wire)
        except MessageError as e:
            self._reject("bad_payload", device, str(e), chunk_wire)
        except Exception as e:  # a handler bug must cost one message, never the service (the fuzz tests hunt these)
            logger.exception("internal error handling a message from %s on %s", device, topic)
            self._reject("internal_error", device, f"{type(e).__name__}: {e}", chunk_wire)

    def _reject(self, reason: str, device: str | None, detail: str, chunk_wire: int) -> None:
        if chunk_wire and device is not None:
            self.ingest.count_rejected(device, chunk_wire)
        self.registry.reject(reason, device, detail)

    def register(self, device: str, data: dict) -> None:
        """A device's registration. The run's facts (classes, C x H x W, feature channels) come from the
        runtime's config where it sets them (``provision`` and ``edgefl-sim`` do), else from the first registration
        that passes every check; every later one must agree. Raises
        Rejected("bad_registration") with nothing fixed or recorded.

        A registration names the runtime session it answers (the ``hello`` / ``round`` the agent saw). One for
        an earlier session is ignored: the broker delivers it late (it held it for this runtime's persistent
        session while no runtime ran: an agent that started before this runtime saw the previous runtime's
        retained ``round``), and the same agent registers again for this session once it sees this session's
        ``hello``; processing both logged every device as registered, then re-registered, at start. What the
        device sent after that registration (its uploads for the earlier session) is ignored too (:meth:`_late`)."""
        session = data.get("session")
        if session is not None and (not isinstance(session, str) or len(session) > 64):
            raise Rejected("bad_registration", f"session must be a string of at most 64 characters, got "
                                               f"{str(session)[:40]!r}")
        num_classes, channels = data.get("num_classes"), data.get("feature_channels")
        EdgePrograms.check(device, data, self.recipes.get(device, self.recipes[None]))
        awaits_program = data.get("engine") == "onnxruntime" and channels is None  # the program says, once sent
        if type(num_classes) is not int or not (2 <= num_classes <= 100_000) or not awaits_program and (
                type(channels) is not int or not (1 <= channels <= 65_536)):
            raise Rejected("bad_registration", f"num_classes {str(num_classes)[:20]}, feature_channels "
                                               f"{str(channels)[:20]}")
        facts = device_facts(data)
        cap = self.cfg.validation.max_samples_per_device
        if not 1 <= facts["train_samples"] <= cap or facts["test_samples"] > cap:
            raise Rejected("bad_registration", f"train_samples {facts['train_samples']}, test_samples "
                                               f"{facts['test_samples']}: each at most {cap}, and at least 1 to train")
        strategy, cfg = self.strategy, self.cfg
        run_classes = strategy.num_classes or cfg.num_classes or num_classes
        run_shape = strategy.input_shape or cfg.input_shape or facts["input_shape"]
        if num_classes != run_classes:
            raise Rejected("bad_registration", f"{num_classes} classes, the run has {run_classes}")
        if facts["input_shape"] is not None and facts["input_shape"] != run_shape:
            raise Rejected("bad_registration", f"input shape {facts['input_shape']}, the run's is {run_shape}")
        expected_channels = strategy.feature_channels if strategy.num_classes is not None else \
            strategy.run_feature_channels(run_classes, run_shape) if run_shape is not None else None
        if awaits_program and run_shape is None:
            raise Rejected("bad_registration", "engine onnxruntime: the registration names no input_shape and the "
                                               "runtime config sets none")
        if awaits_program:
            channels = expected_channels if expected_channels is not None else \
                strategy.run_feature_channels(run_classes, run_shape)
        if expected_channels is not None and channels != expected_channels and cfg.algorithm != "fedavg":
            raise Rejected("bad_registration", f"{channels} feature channels, the run's edge model has "
                                               f"{expected_channels}")
        # well-formed, but for an earlier session (decided before this registration may fix the run's facts)
        if session is not None and session != self.session:
            if self.late_counts.get(device, 0) >= LATE_MESSAGES_PER_DEVICE:
                raise Rejected("bad_registration", f"registration for runtime session {session[:40]!r}, not this "
                               f"runtime's ({self.session}), after {LATE_MESSAGES_PER_DEVICE} late messages")
            logger.debug("%s: ignored a registration for runtime session %s (an earlier runtime's, delivered late); "
                         "it registers again for this session %s", device, session, self.session)
            self.late_sessions[device] = session
            self.late_counts[device] = self.late_counts.get(device, 0) + 1
            self.late_messages += 1
            return
        if strategy.num_classes is None:  # every check passed: this registration may fix the run's facts
            strategy.setup(run_classes, run_shape, channels)
        if self.ingest.forget(device):  # a new process
            self.registry.log(device, "forgot", "%s re-registered: its open transfers were dropped", device)
        again = device in self.registry.devices  # (its ingest worker drops what the old process left open too)
        old = self.registry.devices.get(device, {})
        if (old.get("train_samples"), old.get("test_samples")) != (facts["train_samples"], facts["test_samples"]):
            self.ingest.device_ids.pop(device, None)  # its data changed: the ids it uploads are pinned anew
        edge = self.recipes.get(device, self.recipes[None]).edge
        self.late_sessions.pop(device, None)
        self.registry.register(device, facts, {
            "model": edge.model, "trainer": edge.trainer, "batch_size": edge.batch_size, "epochs": edge.epochs,
            "model_kwargs": edge.model_kwargs, "optimizer": edge.optimizer, "codec": self.cfg.codec})
        strategy.on_register(device)
        if self.shards:
            self.shards.registered(device, again)
        self.programs.on_register(device, data, run_classes, run_shape)

    def _late(self, device: str, what: str) -> bool:
        """A message from a device not registered for this session whose last registration answered an earlier
        one: sent for that session (one publisher's messages on a topic arrive in order), delivered late. Ignored
        (it is not this device misbehaving: no rejection is charged); the device registers for this session next."""
        if device in self.registry.devices or device not in self.late_sessions:
            return False
        if self.late_counts.get(device, 0) >= LATE_MESSAGES_PER_DEVICE:
            # more than an old session can have left in flight: judged (and charged) like any message from
            # a device that has not registered
            return False
        self.late_counts[device] = self.late_counts.get(device, 0) + 1
        self.late_messages += 1
        logger.debug("%s: ignored a late %s for runtime session %s", device, what, self.late_sessions[device])
        return True

    def _on_chunk(self, device: str, header: dict, body: bytes, wire: int) -> None:
        """A chunk: reassemble; judge a completed transfer (ACK with the verdict, remembered for resends);
        answer a sender's ``ack`` request with what is held (:mod:`edgefl_core.reliable`). The ingest counts
        the chunk's bytes; a rejected transfer's are counted here."""
        try:
            done = self.ingest.add_chunk(device, header, body, wire)
        except (Rejected, P.ProtocolError):
            self._answer(device, header)  # the sender learns which chunks are missing (or the verdict)
            raise
        if done is None:
            self._answer(device, header)
            return
        self._judge(device, done, lambda accepted, reason: self.ingest.reassembler.settle(
            device, done.transfer, accepted, reason))

    def _count_message(self) -> None:
        self.messages_in += 1
        self.telemetry.counters.messages.inc()

    def _judge(self, device: str, done: P.CompletedTransfer, settle, refused: Rejected | None = None) -> None:
        """A completed transfer, reassembled here or by an ingest worker: the strategy accepts it or raises
        Rejected; either way the device gets the verdict (ACK) and ``settle(accepted, reason)`` records it where
        the transfer was reassembled (what a sender asking again is answered). ``refused``: the verdict is
        already known (a forward refused from its first part)."""
        try:
            if refused is not None:
                raise refused
            what = self.strategy.accept(device, done)  # accepted: the strategy counts it (Ingest.count_accepted)
        except Exception as e:  # every outcome is a verdict: a sender left without one would ask for ever
            reason = e.reason if isinstance(e, (Rejected, P.ProtocolError)) else \
                "bad_payload" if isinstance(e, MessageError) else "internal_error"
            self.ingest.count_rejected(device, done.wire_bytes)
            settle(False, reason)
            self.downlink.ack(device, done, accepted=False, reason=reason)
            raise
        settle(True, None)
        self.registry.accepted(device)
        self.downlink.ack(device, done)
        # an honest device's uploads (one per split a round) are each a line however quick the rounds; re-sends of
        # one upload, which a device can repeat at will, are at most 3 lines every few seconds
        split = done.meta.get("split")  # only FedGKT checks it: a FedAvg update's is whatever the device sent
        upload = f"{split if split in ('train', 'test') else 'update'} of round {done.round}"
        self.registry.log(device, f"accepted {upload}", "%s: %s", device, what)

    def _answer(self, device: str, header: dict) -> None:
        """Reply to a chunk that asks for progress (``ack``: the sender's sequence number)."""
        data = self.ingest.reassembler.answer(device, header) if device in self.registry.devices else None
        if data is not None:
            self.downlink.progress(device, header["round"], data)

    # -- state and report ---------------------------------------------------------------------------

    def checkpoint(self) -> None:
        """Commit models and state (``store.py``), then rewrite ``report.json``. A failed commit (disk full,
        I/O error) is a status, not a crash: the run goes on from memory, the last committed generation stays
        what a restart resumes from, and ``report.json`` / the log say so."""
        try:
            self.store.commit(self.strategy.models(), {"identity": self.identity, **self.strategy.snapshot(),
                                                       **self.registry.snapshot(),
                                                       **self.ingest.snapshot()})
            if self.checkpoint_error:
                logger.warning("checkpoints are written again (generation %d)", self.store.generation)
            self.checkpoint_error = None
        except OSError as e:
            free = _free_mb(self.store)
            self.checkpoint_error = {"error": f"{type(e).__name__}: {e.strerror or e}", "free_mb": free,
                                     "committed_generation": self.store.generation, "time": time.time()}
            logger.error("checkpoint failed (%s; %s MB free in %s): the run continues from memory; a restart "
                         "resumes from generation %d", e.strerror or e, free, self.store.dir, self.store.generation)
        try:
            self.write_report()
        except OSError as e:
            logger.error("report.json not written: %s", e.strerror or e)

    def restore(self) -> bool:
        """Resume from the state directory when it holds this run's state. Raises StateMismatch (naming the
        difference and the remedy) when it holds another run's: never a silent resume into the wrong run."""
        state = self.store.load()
        if state is None:
            return False
        problem = identity_problem(state.get("identity"), self.identity)
        if problem:
            raise StateMismatch(f"{self.store.dir} holds {problem}. Start this run afresh with "
                                "'cloud-runtime serve --reset-state' (moves that state aside) or give it another "
                                "state_dir; to resume that run, use its config")
        if isinstance(state.get("identity"), dict):  # state from before identities were recorded has none
            self.identity["instance"] = state["identity"]["instance"]
            self.downlink.recipe["instance"] = self.identity["instance"]
        self.registry.restore(state)
        self.ingest.restore(state)
        self.strategy.restore(state)
        logger.info("resumed from %s at round %d", self.store.dir, self.strategy.next_round)
        return True

    def report(self) -> dict:
        run = {"name": self.cfg.run_id, "transport": self.cfg.broker.scheme, "algorithm": self.cfg.algorithm,
               "late_messages": self.late_messages, "edge_programs": self.programs.report(), "mode": self.cfg.mode,
               "privacy": run_privacy(self.cfg, self.registry.devices), "strategy": strategy_name(self.cfg),
               "server_model": self.cfg.server.model, "server_params": self.strategy.parameter_count(), "session": self.session,
               "console": self.console_info, "threads": self.strategy.ctx.threads,
               "server_precision": self.cfg.server.precision,
               "server_ranks": {"world_size": self.group.world, "backend": self.group.backend,
                                "restart": self.group.launch.restart} if self.group is not None else None,
               "ingest_workers": self.shards.report() if self.shards else None,
               "edge_params": next((d.get("edge_params") for d in self.registry.devices.values()), None),
               "checkpoint": {"generation": self.store.generation, "error": self.checkpoint_error,
                              "skipped_on_restore": self.store.skipped}}
        if self.stop.is_set() and self.strategy.next_round < self.cfg.rounds:
            run["stopped"] = True  # asked to stop (SIGTERM, Ctrl-C) before its last round: a partial report
        return build_report(run, self.strategy.rows, self.registry, self.messages_in, self.started, self.costs)

    def write_report(self) -> dict:
        self.board.refresh(self, force=True)  # the console shows what the report says
        report = self.report()
        self.store.dir.mkdir(parents=True, exist_ok=True)  # a stop before the first checkpoint has made no state dir
        write_json(self.store.dir / "report.json", report)
        return report

    def serve(self) -> dict:
        """Resume, wait for devices, run the strategy's rounds, announce the end; returns the report."""
        self.restore()
        if self.strategy.next_round >= self.cfg.rounds and self.strategy.rows:
            # announcing the end again under a new session would be one no device took part in; the end its
            # devices saw (retained on the control topic) stands
            logger.warning("run %r already finished (%d rounds, state in %s): nothing to do. Raise rounds to go on, "
                           "or start a new run with 'cloud-runtime serve --reset-state' or a new run_id",
                           self.cfg.run_id, self.strategy.next_round, self.store.dir)
            return self.write_report()
        self.start()
        interrupted = None
        if self.strategy.next_round < self.cfg.rounds:
            self.telemetry.set_phase("waiting for devices", self.strategy.next_round)
            self.wait_for_devices()
            try:
                self.strategy.run()
            except Interrupted as e:  # stop was set during the server's compute: that round is discarded
                interrupted = str(e)
        if self.stop.is_set():
            return self.stopped(interrupted)
        self.downlink.broadcast(P.SHUTDOWN, self.strategy.next_round, session=self.session)
        self.transport.flush(30)
        self.telemetry.set_phase("finished", self.strategy.next_round)
        report = self.write_report()
        plot_accuracy(report, self.store.dir / "accuracy.png")
        if report["final"].get("test_accuracy") is not None:
            final = report["final"]
            logger.info("run finished: test accuracy %.4f, upload %.1f MB (%.1fx smaller than fp32; %.2f MB re-sent, "
                        "%.2f MB rejected), %d rejected messages", final["test_accuracy"], final["bytes_up"] / 1e6,
                        final["upload_compression_ratio"], final["bytes_resent"] / 1e6, final["bytes_rejected"] / 1e6,
                        sum(self.registry.rejections.values()))
        return report

    def stopped(self, interrupted: str | None = None) -> dict:
        """Asked to stop (SIGTERM, Ctrl-C): save the rounds done, write ``report.json`` and the accuracy plot of
        those rounds. ``interrupted``: the compute that was cut short (its round's models are part-updated, so
        nothing is committed: the last round's checkpoint stands and a restart redoes the round). A runtime whose
        broker session another one took over writes nothing: the state directory is the other's now."""
        if self.transport.taken_over:
            return self.report()
        done = self.strategy.next_round
        self.telemetry.set_phase("stopped", done)
        if interrupted:
            logger.warning("stopped during %s: round %d is not saved; the checkpoint after %d rounds stands (a "
                           "restart resumes from it)", interrupted, done, done)
            try:
                self.write_report()
            except OSError as e:
                logger.error("report.json not written: %s", e.strerror or e)
        else:
            logger.info("stopping: state saved at round %d", done)
            self.checkpoint()
        report = self.report()
        try:
            plot_accuracy(report, self.store.dir / "accuracy.png")
        except Exception as e:  # a plot must not turn a clean stop into a crash
            logger.warning("accuracy.png not written: %s: %s", type(e).__name__, e)
        return report

    def wait_for_devices(self) -> None:
        self.registry.wait_for_devices(self.pump, self.stop)

    def close(self) -> None:
        """Disconnect, and let the strategy release what it holds (memory-mapped feature files); the training
        ranks of a torchrun launch are told the run is over."""
        self.transport.close()
        self.strategy.close()
        if self.group is not None:
            self.group.close()
            self.group = None


class StateMismatch(CheckpointError):
    """The state directory holds another run's state."""


def _free_mb(store: DurableStore) -> float | None:
    try:
        return round(store.free_bytes() / 1e6, 1)
    except OSError:
        return None


def build_runtime(cfg: RuntimeConfig, transport: Transport | None = None, launch=None) -> CloudRuntime:
    """A runtime for ``cfg`` on ``transport`` (default: the one ``cfg.broker.url`` names). ``launch``: this
    process is rank 0 of a torchrun launch (:func:`cloud_runtime.distributed.launched`): it coordinates, and
    server training runs on every rank."""
    group = None
    if launch is not None:
        from cloud_runtime.distributed import TrainingGroup, server_device
        threads_for_rank(cfg, launch)
        group = TrainingGroup(launch, cfg.server.dist_backend, cfg.server.dist_timeout_s,
                              server_device(cfg.server, launch.local_rank).type == "cuda")
    elif cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    try:
        if transport is None:
            transport = create_transport(cfg.broker, f"edgefl-runtime-{cfg.run_id}")
        return CloudRuntime(cfg, transport, group)
    except BaseException:
        if group is not None:
            group.close()
        raise


def check_launch(cfg: RuntimeConfig, launch) -> None:
    """What a torchrun launch needs of the config (:func:`~cloud_runtime.config.check_server_ranks`), checked
    on every rank before any joins the group. Raises ConfigError."""
    check_server_ranks(cfg.algorithm, cfg.server.batch_size, launch.world_size, "torchrun's WORLD_SIZE")


def threads_for_rank(cfg: RuntimeConfig, launch) -> int:
    """A torchrun rank's intra-op threads: ``threads`` when set, else its share of the usable cores among the
    machine's ranks (torchrun's own default of 1 leaves cores idle; more than a share oversubscribes)."""
    from edgefl_core.proc import usable_cores
    cores, ranks = usable_cores(), max(1, launch.local_world_size)
    threads = cfg.threads or max(1, cores // ranks)
    if threads * ranks > cores:
        logger.warning("threads: %d ranks x %d threads on %d cores: thread pools that share cores slow down many "
                       "times over; leave threads null to give each rank its share", ranks, threads, cores)
    torch.set_num_threads(threads)
    return threads
