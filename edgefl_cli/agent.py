"""``edge-agent``: the daemon on each device (``--config agent.yaml``)."""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from edge_sdk.agent import build_agent
from edge_sdk.config import load_agent_config
from edgefl_cli.interrupt import EXIT_INTERRUPTED, CtrlC
from edgefl_cli.logs import HelpFormatter, add_config_options, setup_logging
from edgefl_core.config import ConfigError
from edgefl_core.data.datasets import DatasetError

logger = logging.getLogger("edgefl.agent")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent", description="edgefl edge agent (FedGKT device daemon)",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, help="agent YAML")
    add_config_options(parser, "upload.max_bytes_per_s=500000")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return run(args)
    except KeyboardInterrupt:  # before it started, or a second Ctrl-C
        logger.warning("stopped at once")
        return EXIT_INTERRUPTED


def run(args) -> int:
    """SIGTERM and a first Ctrl-C stop the agent cleanly (state saved, offline status published)."""
    try:
        cfg = load_agent_config(args.config, args.overrides)
        agent = build_agent(cfg)
    except (ConfigError, DatasetError) as e:
        logger.error("%s", e)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: agent.stop.set())
    with CtrlC(agent.stop.set, "saving this device's state, then stopping") as ctrl_c:
        try:
            agent.start()
        except ConnectionError as e:
            logger.error("%s", e)
            return EXIT_INTERRUPTED if ctrl_c.pressed else 2
        try:
            code = agent.serve()
        except Exception:  # a bug or a broken device: say so and exit non-zero (a supervisor restarts the daemon)
            logger.exception("edge-agent failed")
            return 1
        finally:
            agent.shutdown()
    return EXIT_INTERRUPTED if ctrl_c.pressed else code


if __name__ == "__main__":
    sys.exit(main())
