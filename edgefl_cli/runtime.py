"""``cloud-runtime``: ``serve`` runs one run's cloud side over a broker; ``provision`` writes a deployment."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from cloud_runtime import provision
from cloud_runtime.config import load_runtime_config
from cloud_runtime.store import CheckpointError
from cloud_runtime.service import build_runtime
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
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    if args.command == "provision":
        try:
            return provision.main(args)
        except ValueError as e:
            logger.error("provision: %s", e)
            return 2
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
        keep = (args.config, cfg.eval_data.path if cfg.eval_data else None)
        if args.reset_state and (aside := move_aside(cfg.state_dir, keep)) is not None:
            logger.info("--reset-state: moved the previous state to %s", aside)
        runtime = build_runtime(cfg)
    except (ConfigError, ConnectionError) as e:
        logger.error("%s", e)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: runtime.stop.set())
    with CtrlC(runtime.stop.set, "saving the rounds done, writing report.json, then stopping") as ctrl_c:
        try:
            runtime.serve()
        except (ConnectionError, CheckpointError) as e:
            logger.error("%s", e)
            return 2
        finally:
            runtime.close()
    if ctrl_c.pressed:
        logger.info("stopped (Ctrl-C): report of %d rounds in %s", runtime.strategy.next_round,
                    runtime.store.dir / "report.json")
        return EXIT_INTERRUPTED
    return 0


if __name__ == "__main__":
    sys.exit(main())
