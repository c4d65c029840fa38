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
from edgefl_cli.logs import HelpFormatter, add_config_options, setup_logging
from edgefl_core.config import ConfigError

logger = logging.getLogger("edgefl.runtime")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloud-runtime", description="edgefl cloud runtime")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run FedGKT rounds over the broker", formatter_class=HelpFormatter,
                           description="Serve one run's cloud side over its broker: wait for devices, run the "
                                       "rounds, write report.json (Ctrl-C: stop after saving the rounds done; "
                                       "again: at once)")
    serve.add_argument("--config", required=True, help="runtime YAML")
    add_config_options(serve, "server.epochs=2")
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
    except (ConfigError, ConnectionError, CheckpointError) as e:
        logger.error("%s", e)
        return 2
    runtime.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
