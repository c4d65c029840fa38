"""``edge-agent``: the daemon on each device (``--config agent.yaml``), and ``edge-agent data``: check a
device's data or write demo shards."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys

from edgefl_cli.interrupt import EXIT_INTERRUPTED, CtrlC
from edgefl_cli.logs import HelpFormatter, add_config_options, setup_logging
from edgefl_core.config import ConfigError
from edgefl_core.data.datasets import DATASETS, DatasetError
from edgefl_core.files import move_aside

logger = logging.getLogger("edgefl.agent")


def data_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent data", description="a device's own data")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="load the data an agent.yaml names and print what it is (counts, "
                                         "classes, fingerprint) as JSON; exit 2 if it cannot be used")
    check.add_argument("--config", required=True, help="agent YAML")
    check.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value (dotted key, YAML value); repeatable")
    export = sub.add_parser("export", help="write one shard of a dataset as train.npz / test.npz (demo devices)")
    export.add_argument("--dataset", default="fashion_mnist", choices=DATASETS.names(),
                        help="the source dataset (default: %(default)s)")
    export.add_argument("--path", default=None, help="where the dataset is (default: its installed place)")
    export.add_argument("--shard", required=True, help="which of how many disjoint random shards, e.g. 1/2")
    export.add_argument("--train", type=int, default=None, help="at most this many train samples (default: all)")
    export.add_argument("--test", type=int, default=None, help="at most this many test samples (default: all)")
    export.add_argument("--seed", type=int, default=0, help="the shuffle's seed (default: 0)")
    export.add_argument("--out", required=True, help="folder to write train.npz and test.npz into")
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    from edgefl_core.data.local import describe_data, export_shard, load_local_data
    try:
        if args.command == "check":
            from edge_sdk.config import load_agent_config
            cfg = load_agent_config(args.config, args.overrides)
            train, test = load_local_data(cfg.data)
            about = describe_data(cfg.data, train, test)
            print("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in about.items()) + "\n}")
            return 0
        shard, _, shards = args.shard.partition("/")
        written = export_shard(args.dataset, args.path, args.out, int(shard), int(shards or 0),
                               train=args.train, test=args.test, seed=args.seed)
        print(" ".join(str(p) for p in written.values()))
        return 0
    except (ConfigError, DatasetError, ValueError, OSError) as e:
        print(f"edge-agent data {args.command}: {e}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["data"]:
        return data_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="edge-agent", formatter_class=HelpFormatter,
        description="edgefl edge agent (FedGKT device daemon). 'edge-agent data check --config agent.yaml' "
                    "checks the device's data; 'edge-agent data export' writes demo shards.")
    parser.add_argument("--config", required=True, help="agent YAML (paths in it are relative to its folder)")
    add_config_options(parser, "upload.max_bytes_per_s=500000")
    parser.add_argument("--reset-state", action="store_true",
                        help="start afresh: move state_dir aside (to <state_dir>.old-<time>) first")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        return run(args)
    except KeyboardInterrupt:  # before it started, or a second Ctrl-C
        logger.warning("stopped at once")
        return EXIT_INTERRUPTED


def run(args) -> int:
    """SIGTERM and a first Ctrl-C stop the agent cleanly (state saved, offline status published)."""
    from edge_sdk.agent import build_agent
    from edge_sdk.config import load_agent_config
    try:
        cfg = load_agent_config(args.config, args.overrides)
        keep = (args.config, cfg.data.path, cfg.data.ids_file)  # never the bundle with the state
        if args.reset_state and (aside := move_aside(cfg.state_dir, keep)) is not None:
            logger.info("--reset-state: moved the previous state to %s", aside)
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
