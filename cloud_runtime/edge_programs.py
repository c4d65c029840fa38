"""Edge programs for devices on ``engine: onnxruntime``: the cloud compiles, devices execute.

A device that registers with ``engine: onnxruntime`` gets the program of its recipe (edge model, trainer,
FedGKT loss, for the run's classes and image shape). The first such registration starts a compile in a
fresh process (``python -m edge_sdk.program.compile``: the export patches torch globally and a failed
forward-mode trace poisons later ones), off the runtime's thread; the program is cached under
``<state_dir>/edge_programs/<spec key>.edgeprog``, so a restart or the next run of the same configuration
compiles nothing. Delivery: the digest joins ``edge_programs`` in the recipe every HELLO / ROUND carries
(the control topic and a device's downlink are the runtime's alone, by broker ACL), a HELLO with it goes to
the device's downlink, then the program as a chunked transfer (``kind: edge_program``). The device accepts
only a blob that hashes to an announced digest and passes :func:`edge_sdk.program.format.check_graph`.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from cloud_runtime.program_build import cached_program_path, compile_spec, torch_version
from cloud_runtime.registry import Rejected
from edge_sdk import protocol as P
from edge_sdk.program.format import ProgramError, program_digest, unpack_program
from edge_sdk.program.spec import onnx_trainer_problem, program_spec, spec_key

logger = logging.getLogger("edgefl.runtime")
RESEND_AFTER_S = 120.0       # a device's program again only after this (or from a new process: another pid)
PROGRAMS_PER_WINDOW = 3       # at most this many deliveries to one device per PROGRAM_WINDOW_S, whatever the
PROGRAM_WINDOW_S = 600.0      # pid its registrations state (the pid is the device's claim: a new one each time
#                               made 200 registrations of 212 bytes cost 156 MB down)
RETRY_COMPILE_AFTER_S = 300.0


@dataclass
class Build:
    key: str
    trainer: str
    blob: bytes | None = None
    digest: str | None = None
    seconds: float = 0.0
    cached: bool = False
    error: str | None = None
    failed_at: float = 0.0
    thread: threading.Thread | None = None
    waiting: dict = field(default_factory=dict)   # device -> its pid: to send it to once built

    @property
    def done(self) -> bool:
        return self.blob is not None or self.error is not None


class EdgePrograms:
    """``recipes``: device (None: the default) -> RunRecipe; ``downlink``: the runtime's; ``round_now()``: the
    round a HELLO names; ``session``: this runtime session."""

    def __init__(self, state_dir: str | Path, recipes: dict, downlink, round_now, session: str, seed: int = 0):
        self.state_dir = state_dir
        self.recipes, self.downlink, self.round_now, self.session, self.seed = recipes, downlink, round_now, session, seed
        self.builds: dict[str, Build] = {}
        self.delivered: dict[str, tuple[str, float, object]] = {}  # device -> (digest, when, its pid)
        self.recent: dict[str, list[float]] = {}  # device -> when its program was sent, within PROGRAM_WINDOW_S
        self.refused_at: dict[str, float] = {}    # device -> when a copy was last refused it (logged once a window)
        self.announced: list[str] = downlink.recipe.setdefault("edge_programs", [])

    def on_register(self, device: str, data: dict, num_classes: int, input_shape) -> None:
        """A registration that passed every check. Devices on onnxruntime get their program (compiled first
        if need be). Raises Rejected when the recipe's trainer has no graph (before anything is recorded)."""
        if data.get("engine") != "onnxruntime":
            return
        edge = self.recipes.get(device, self.recipes[None]).edge
        spec = program_spec(edge, num_classes, input_shape, self.seed, torch_version())
        key = spec_key(spec)
        build = self.builds.get(key)
        if build is not None and build.error and time.monotonic() - build.failed_at > RETRY_COMPILE_AFTER_S:
            build = None  # try the compile again (a full disk, a killed compiler)
        if build is None:
            build = self.builds[key] = Build(key, edge.trainer)
            self._start(build, spec)
        if build.error:
            logger.warning("%s: engine onnxruntime, but its edge program failed to compile (%s): it cannot train",
                           device, build.error)
            return
        if build.blob is None:
            build.waiting[device] = data.get("pid")
        elif data.get("program") != build.digest:
            last, now = self.delivered.get(device), time.monotonic()
            recent = self.recent[device] = [t for t in self.recent.get(device, []) if now - t < PROGRAM_WINDOW_S]
            asks_again = last is not None and (last[2] != data.get("pid") or now - last[1] > RESEND_AFTER_S)
            if last is None or last[0] != build.digest or (asks_again and len(recent) < PROGRAMS_PER_WINDOW):
                self._deliver(device, build, data.get("pid"))
            elif asks_again and now - self.refused_at.get(device, -PROGRAM_WINDOW_S) >= PROGRAM_WINDOW_S:  # logged
                self.refused_at[device] = now
                logger.warning("%s: edge program not sent again: %d copies in the last %.0f s (a device without its "
                               "program registers again later)", device, len(recent), PROGRAM_WINDOW_S)
            # else: sent moments ago to this same process (registrations repeat; each copy is ~1 MB down)

    @staticmethod
    def check(device: str, data: dict, recipe) -> None:
        """Refuse an onnxruntime registration whose recipe trainer has no graph (the engine's value itself is
        checked with the other device facts, ``registry.device_facts``). Raises Rejected."""
        problem = onnx_trainer_problem(recipe.edge.trainer) if data.get("engine") == "onnxruntime" else None
        if problem:
            raise Rejected("bad_registration", f"engine onnxruntime cannot run edge.trainer={recipe.edge.trainer}: "
                                               f"{problem}; use backprop or fg_weight, or engine torch on {device}")

    def _start(self, build: Build, spec: dict) -> None:
        path = cached_program_path(self.state_dir, spec)
        if path.exists():
            try:  # the cache is checked as a device checks it: a file changed on disk is not announced
                blob = path.read_bytes()
                unpack_program(blob)
            except (OSError, ProgramError) as e:
                logger.warning("%s: cached edge program refused (%s): compiling anew", path, e)
                path.unlink(missing_ok=True)
            else:
                build.blob, build.cached, build.digest = blob, True, program_digest(blob)
                self._announce(build)
                return
        logger.info("compiling the edge program for %s + %s (engine onnxruntime) in a separate process",
                    spec["edge"]["model"], build.trainer)
        build.thread = threading.Thread(target=self._compile, args=(build, spec, path), daemon=True,
                                        name=f"edge-program-{build.key[:8]}")
        build.thread.start()

    def _compile(self, build: Build, spec: dict, path: Path) -> None:
        """Runs on its own thread: only waits for the compiler process; the result is picked up by :meth:`poll`."""
        try:
            blob, build.seconds = compile_spec(spec, path)
            build.digest = program_digest(blob)
            build.blob = blob  # last: poll() takes a build as done once blob is set
        except Exception as e:
            build.failed_at = time.monotonic()
            build.error = f"{type(e).__name__}: {str(e)[:300]}"

    def announce_cached(self, num_classes: int, input_shape) -> None:
        """At start, with the run's data configured: announce every recipe's program already in the cache
        (``cloud-runtime program build``, an earlier run), so the first HELLO carries its digest and a device
        that has it installed needs no transfer."""
        for recipe in self.recipes.values():
            if onnx_trainer_problem(recipe.edge.trainer):
                continue
            spec = program_spec(recipe.edge, num_classes, input_shape, self.seed, torch_version())
            key = spec_key(spec)
            if key not in self.builds and cached_program_path(self.state_dir, spec).exists():
                self.builds[key] = Build(key, recipe.edge.trainer)
                self._start(self.builds[key], spec)

    def poll(self) -> None:
        """On the runtime's thread: announce finished builds and send them to the devices waiting."""
        for build in self.builds.values():
            if build.thread is not None and build.done:
                build.thread = None
                if build.error:
                    logger.error("edge program for %s: compile failed (%s); devices on onnxruntime cannot train",
                                 build.trainer, build.error)
                    continue
                logger.info("edge program %s compiled in %.1f s (%.0f KB)", build.digest[:12], build.seconds,
                            len(build.blob) / 1024)
                self._announce(build)
                for device, pid in sorted(build.waiting.items()):
                    self._deliver(device, build, pid)
                build.waiting.clear()

    def _announce(self, build: Build) -> None:
        if build.digest not in self.announced:
            self.announced.append(build.digest)

    def _deliver(self, device: str, build: Build, pid) -> None:
        self.delivered[device] = (build.digest, time.monotonic(), pid)
        self.recent.setdefault(device, []).append(time.monotonic())
        round_ = self.round_now()
        self.downlink.send(device, P.HELLO, round_, session=self.session)  # carries the digest (recipe)
        self.downlink.send_transfer(device, build.blob, round_, {"kind": P.KIND_EDGE_PROGRAM, "digest": build.digest})
        logger.info("%s: edge program %s sent (%.0f KB)", device, build.digest[:12], len(build.blob) / 1024)

    def report(self) -> list[dict]:
        return [{"digest": b.digest, "trainer": b.trainer, "bytes": len(b.blob) if b.blob else None,
                 "compile_seconds": round(b.seconds, 2), "cached": b.cached, "error": b.error}
                for b in self.builds.values()]
