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
from edgefl_core.files import move_aside
from edgefl_cli.logs import setup_logging
from edgefl_core.config import ConfigError

logger = logging.getLogger("edgefl.runtime")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloud-runtime", description="edgefl cloud runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run FedGKT rounds over the broker")
    serve.add_argument("--config", required=True, help="runtime YAML (paths in it are relative to its folder)")
    serve.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value (dotted key, YAML value), e.g. --set rounds=2; repeatable")
    serve.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                       help="default: %(default)s")
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
        cfg = load_runtime_config(args.config, args.overrides)
        if args.reset_state and (aside := move_aside(cfg.state_dir)) is not None:
            logger.info("--reset-state: moved the previous state to %s", aside)
        runtime = build_runtime(cfg)
        signal.signal(signal.SIGTERM, lambda *_: runtime.stop.set())
        runtime.serve()
    except (ConfigError, ConnectionError, CheckpointError) as e:
        logger.error("%s", e)
        return 2
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
