"""``cloud-runtime``: ``serve`` runs one run's cloud side over a broker; ``provision`` writes a deployment;
``program build`` compiles the edge program of a run's recipe ahead of time (air-gapped devices on onnxruntime)."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import signal
import sys
from pathlib import Path

from edgefl_cli.needs import require_torch

require_torch("cloud-runtime")  # before the imports that need it

from cloud_runtime import provision
from cloud_runtime.config import load_runtime_config
from cloud_runtime.console import start_console
from cloud_runtime.store import CheckpointError
from cloud_runtime.distributed import launched, serve_rank
from cloud_runtime.ingest_worker import WorkerPool
from cloud_runtime.service import build_runtime, check_launch, threads_for_rank
from edgefl_cli.interrupt import EXIT_INTERRUPTED, CtrlC
from edgefl_cli.logs import HelpFormatter, add_config_options, setup_logging
from edgefl_core.files import move_aside
from edgefl_core.config import ConfigError

logger = logging.getLogger("edgefl.runtime")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloud-runtime", description="edgefl cloud runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run FedGKT rounds over the broker", formatter_class=HelpFormatter,
                           description="Serve one run's cloud side over its broker: wait for devices, run the "
                                       "rounds, write report.json (Ctrl-C: stop after saving the rounds done; "
                                       "again: at once)")
    serve.add_argument("--config", required=True, help="runtime YAML (paths in it are relative to its folder)")
    add_config_options(serve, "server.epochs=2")
    serve.add_argument("--reset-state", action="store_true",
                       help="start the run afresh: move state_dir aside (to <state_dir>.old-<time>) first")
    provision.add_parser(sub)
    add_program_parser(sub)
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    if args.command == "provision":
        try:
            return provision.main(args)
        except ValueError as e:
            logger.error("provision: %s", e)
            return 2
    if args.command == "program":
        return program_build_command(args)
    try:
        return serve_command(args)
    except KeyboardInterrupt:  # before serving began, or a second Ctrl-C: stop at once
        logger.warning("stopped at once: report.json and the checkpoint are those of the last round saved")
        return EXIT_INTERRUPTED


def serve_command(args) -> int:
    """SIGTERM and a first Ctrl-C stop the runtime cleanly (the rounds done saved, report.json and the plot
    written); Ctrl-C exits 130, a second one at once (KeyboardInterrupt, handled by the caller)."""
    try:
        cfg = load_runtime_config(args.config, args.overrides)
        launch = launched()
        if launch is not None:
            check_launch(cfg, launch)
        if launch is not None and not launch.coordinator:  # a training rank: no broker, no state of its own
            threads_for_rank(cfg, launch)
            return serve_rank(launch, cfg)
        keep = (args.config, cfg.eval_data.path if cfg.eval_data else None)
        if args.reset_state and launch is not None and launch.restart:
            logger.warning("--reset-state ignored: this is torchrun's restart %d of the group, which resumes from "
                           "the state the first attempt wrote", launch.restart)
        elif args.reset_state and (aside := move_aside(cfg.state_dir, keep)) is not None:
            logger.info("--reset-state: moved the previous state to %s", aside)
        runtime = build_runtime(cfg, launch=launch)
    except (ConfigError, ConnectionError, ValueError) as e:
        logger.error("%s", e)
        return 2
    workers = None
    if cfg.ingest.workers and cfg.ingest.spawn:  # sharded ingest: this machine's workers, restarted when they die
        workers = WorkerPool(args.config, args.overrides, cfg.ingest.workers, cfg.ingest.restart_delay_s,
                             args.log_level)
        runtime.shards.on_unserved = workers.resume  # a worker taken over comes back once the other has gone
    signal.signal(signal.SIGTERM, lambda *_: runtime.stop.set())
    console = start_console(runtime)
    with CtrlC(runtime.stop.set, "saving the rounds done, writing report.json, then stopping") as ctrl_c:
        try:
            runtime.serve()
            finished = not runtime.stop.is_set()
            if console is not None and cfg.console.linger_s > 0 and finished:
                logger.info("run over: the console stays up for %.0f s (console.linger_s; Ctrl-C ends it)",
                            cfg.console.linger_s)
                runtime.stop.wait(cfg.console.linger_s)
        except (ConnectionError, CheckpointError) as e:
            logger.error("%s", e)
            return 2
        finally:
            if console is not None:
                console.stop()
            runtime.close()
            if workers is not None:
                workers.close()
    if runtime.transport.taken_over:
        return 2  # another runtime holds this identity: a restart cannot fix that
    if ctrl_c.pressed and not finished:
        logger.info("stopped (Ctrl-C): report of %d rounds in %s", runtime.strategy.next_round,
                    runtime.store.dir / "report.json")
        return EXIT_INTERRUPTED
    return 0


def add_program_parser(sub) -> None:
    program = sub.add_parser("program", help="edge programs for devices on engine onnxruntime",
                             description="Edge programs: the ONNX graphs, manifest and initial state a device on "
                                         "engine onnxruntime runs (docs/EDGE_RUNTIME.md)")
    psub = program.add_subparsers(dest="program_command", required=True)
    build = psub.add_parser(
        "build", formatter_class=HelpFormatter,
        help="compile the edge program of a runtime config's recipe into its cache and a file (air-gapped devices)",
        description="Compile the edge program of the runtime config's recipe (for --device: with its edge_overrides) "
                    "in a separate process, write it into the runtime's cache (<state_dir>/edge_programs/, where "
                    "'cloud-runtime serve' with this config finds it and announces its digest) and copy it to --out. "
                    "On each device: 'edge-agent program install FILE --config agent.yaml'. Prints digest, size and "
                    "compile time as JSON. num_classes and input_shape must be set in the runtime config.")
    build.add_argument("--config", required=True, help="runtime YAML (paths in it are relative to its folder)")
    add_config_options(build, "edge.batch_size=32")
    build.add_argument("--device", default=None,
                       help="the program of this device's recipe (edge_overrides.<device>); default: the run's recipe")
    build.add_argument("--out", required=True,
                       help="where to copy the program: a file, or an existing folder (<folder>/<digest>.edgeprog)")
    build.add_argument("--rebuild", action="store_true",
                       help="compile even if the runtime's cache already holds this program (a new digest then)")


def program_build_command(args) -> int:
    """``cloud-runtime program build``: exit 2 for a config that has no program (unset run data, a trainer the
    onnxruntime engine does not run), 1 when the compile fails."""
    from cloud_runtime.program_build import CompileError, build_cached, cached_program_path, run_program_spec
    from edge_sdk.program.format import ProgramError, unpack_program
    try:
        cfg = load_runtime_config(args.config, args.overrides)
        spec = run_program_spec(cfg, args.device)
    except ConfigError as e:
        logger.error("program build: %s", e)
        return 2
    if args.device and args.device not in cfg.edge_overrides:
        logger.info("%s has no edge_overrides entry: building the run's recipe", args.device)
    edge = spec["edge"]
    cached = cached_program_path(cfg.state_dir, spec)
    logger.info("edge program for %s + %s, %d classes of %s images: %s", edge["model"], edge["trainer"],
                spec["num_classes"], "x".join(map(str, spec["input_shape"])),
                f"in the runtime's cache ({cached})" if cached.exists() and not args.rebuild else
                "compiling in a separate process (a minute or more)")
    try:
        built = build_cached(cfg.state_dir, spec, rebuild=args.rebuild)
        program = unpack_program(built["blob"], built["digest"])  # what a device will check
    except (CompileError, ProgramError, OSError) as e:
        logger.error("program build: %s", e)
        return 1
    out = Path(args.out)
    if out.is_dir() or args.out.endswith(("/", os.sep)) or (not out.exists() and out.suffix != ".edgeprog"):
        out.mkdir(parents=True, exist_ok=True)  # a folder (programs/): the file is named by its digest
        out = out / f"{built['digest']}.edgeprog"
    try:
        if not out.exists() or not out.samefile(built["path"]):
            tmp = out.with_name(out.name + ".tmp")
            shutil.copyfile(built["path"], tmp)
            os.replace(tmp, out)
    except OSError as e:
        logger.error("program build: --out %s: %s", args.out, e)
        return 2
    about = {"digest": built["digest"], "bytes": len(built["blob"]), "compile_seconds": round(built["seconds"], 2),
             "cached": built["cached"], "trainer": program.manifest["trainer"], "model": edge["model"],
             "num_classes": spec["num_classes"], "input_shape": spec["input_shape"],
             "graphs": sorted(program.graphs), "torch": spec["torch"], "runtime_cache": str(built["path"]),
             "out": str(out)}
    print("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in about.items()) + "\n}")
    logger.info("next: copy %s to each device on engine onnxruntime and run 'edge-agent program install %s --config "
                "agent.yaml' there; serve this config with this installation (torch %s) so the runtime announces "
                "%s", out, out.name, spec["torch"], built["digest"][:12])
    return 0


if __name__ == "__main__":
    sys.exit(main())
