"""``edgefl-sim``: run a FedGKT (or FedAvg) experiment end to end and write ``report.json`` plus plots.

``--transport mqtt`` (the default) deploys real processes over mosquitto; ``--transport memory`` runs
the same runtime and agents as threads of this process over the in-memory bus.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cloud_runtime.config import load_config
from edgefl_cli.logs import HelpFormatter, add_config_options, setup_logging
from edgefl_cli.simulation import run_in_memory, run_over_mqtt
from edgefl_core.config import ConfigError
from edgefl_core.data.datasets import DatasetError

logger = logging.getLogger("edgefl.sim")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgefl-sim", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--config", required=True, help="experiment YAML (e.g. configs/quickstart.yaml)")
    parser.add_argument("--out", default="runs/latest", help="output directory for report.json and plots")
    parser.add_argument("--transport", choices=["mqtt", "memory"], default="mqtt",
                        help="mqtt: real processes over mosquitto; memory: the same, as threads here")
    parser.add_argument("--broker", default=None, metavar="mqtt://host:port",
                        help="use this broker instead of starting a private mosquitto")
    add_config_options(parser, "server.epochs=2")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.transport == "memory":
            report = run_in_memory(cfg, Path(args.out))
        else:
            report = run_over_mqtt(cfg, Path(args.out), args.broker, args.log_level)
    except (ConfigError, DatasetError, FileNotFoundError, RuntimeError) as e:
        logger.error("%s", e)
        return 2
    print(f"final test accuracy: {report['final'].get('test_accuracy')}  report: {Path(args.out) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
