"""``edgefl-sim``: run a FedGKT (or FedAvg) experiment end to end and write ``report.json`` plus plots.

``--transport mqtt`` (the default) deploys real processes over mosquitto; ``--transport memory`` runs
the same runtime and agents as threads of this process over the in-memory bus. Ctrl-C stops the run,
writes the report and plots of the rounds done and exits 130 (a second Ctrl-C: at once).
"""
from __future__ import annotations

import argparse
import logging
import sys
import threading
from pathlib import Path

from edgefl_cli.needs import require_torch

require_torch("edgefl-sim")  # before the imports that need it

from cloud_runtime.config import load_config
from edgefl_cli.interrupt import EXIT_INTERRUPTED, CtrlC
from edgefl_cli.logs import HelpFormatter, add_config_options, setup_logging
from edgefl_cli.simulation import run_in_memory, run_over_mqtt
from edgefl_core.config import ConfigError
from edgefl_core.data.datasets import DatasetError

logger = logging.getLogger("edgefl.sim")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgefl-sim", description=__doc__.splitlines()[0],
                                     formatter_class=HelpFormatter,
                                     epilog="Ctrl-C stops the run: the report and plots of the rounds done are "
                                            "written, exit status 130 (a second Ctrl-C stops at once)")
    parser.add_argument("--config", required=True, help="experiment YAML (e.g. configs/quickstart.yaml)")
    parser.add_argument("--out", default="runs/latest", help="output directory for report.json and plots")
    parser.add_argument("--transport", choices=["mqtt", "memory"], default="mqtt",
                        help="mqtt: real processes over mosquitto; memory: the same, as threads here")
    parser.add_argument("--broker", default=None, metavar="mqtt://host:port",
                        help="use this broker instead of starting a private mosquitto")
    add_config_options(parser, "server.epochs=2")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    stop = threading.Event()
    try:
        with CtrlC(stop.set, "stopping the runtime and the agents, then writing the report of the rounds done"):
            cfg = load_config(args.config, args.overrides)
            if args.transport == "memory":
                report = run_in_memory(cfg, Path(args.out), stop)
            else:
                report = run_over_mqtt(cfg, Path(args.out), args.broker, args.log_level, stop)
    except (ConfigError, DatasetError, FileNotFoundError, RuntimeError) as e:
        if not stop.is_set():
            logger.error("%s", e)
            return 2
        logger.error("while stopping: %s", e)
        return EXIT_INTERRUPTED
    except KeyboardInterrupt:  # a Ctrl-C before the run started, or a second one: stopped at once
        logger.warning("stopped at once: no report written")
        return EXIT_INTERRUPTED
    if report is None or report["run"].get("interrupted"):
        rounds = report["final"]["rounds"] if report else 0
        print(f"interrupted after {rounds} of {cfg.run.rounds} rounds" + (
            f"; test accuracy: {report['final'].get('test_accuracy')}  partial report: "
            f"{Path(args.out) / 'report.json'}" if report else ": no report"))
        return EXIT_INTERRUPTED
    print(f"final test accuracy: {report['final'].get('test_accuracy')}  report: {Path(args.out) / 'report.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
