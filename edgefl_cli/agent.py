"""``edge-agent``: the daemon on each device (``--config agent.yaml``), ``edge-agent data``: check a
device's data or write demo shards, and ``edge-agent program``: install an edge program offline (air-gapped
devices on engine onnxruntime) or list the cached ones. Torch-free at import: the daemon on onnxruntime and
``data`` / ``program`` never load torch."""
from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from pathlib import Path

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


def program_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="edge-agent program",
                                     description="edge programs in this device's cache (engine onnxruntime)")
    sub = parser.add_subparsers(dest="command", required=True)
    install = sub.add_parser(
        "install", formatter_class=HelpFormatter,
        help="check an edge program file and put it in this device's cache (air-gapped devices)",
        description="Check an edge program file as a transfer from the runtime would be checked (format, manifest, "
                    "standard ONNX operators only) and store it in <state_dir>/programs/ by digest. The agent runs "
                    "it once the runtime announces that digest (the runtime whose cache holds it: 'cloud-runtime "
                    "program build'). Prints digest, trainer, graphs and size as JSON; exit 2 if the file is refused.")
    install.add_argument("file", help="the program file ('cloud-runtime program build --out FILE')")
    lister = sub.add_parser("list", formatter_class=HelpFormatter, help="the edge programs in this device's cache",
                            description="One line per cached program: digest, trainer, model, classes, input shape, "
                                        "size; a file that no longer checks is listed as refused, with why")
    lister.add_argument("--json", action="store_true", help="print a JSON list instead")
    for p in (install, lister):
        p.add_argument("--config", required=True, help="agent YAML (its state_dir holds the cache)")
        p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value (dotted key, YAML value); repeatable")
    args = parser.parse_args(argv)
    setup_logging("WARNING")
    from edge_sdk.config import load_agent_config
    from edge_sdk.program.cache import ProgramCache
    from edge_sdk.program.format import ProgramError
    try:
        cfg = load_agent_config(args.config, args.overrides)
        cache = ProgramCache(Path(cfg.state_dir) / "programs")
        if args.command == "install":
            digest, program = cache.install(args.file)
            about = {"digest": digest, **_program_facts(program), "bytes": cache.path(digest).stat().st_size,
                     "path": str(cache.path(digest))}
            print("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in about.items()) + "\n}")
            if cfg.engine != "onnxruntime":
                print(f"edge-agent program install: note: {args.config} has engine {cfg.engine}; the agent runs "
                      "edge programs only with engine: onnxruntime", file=sys.stderr)
            return 0
        return _list_programs(cache, args.json)
    except (ConfigError, ProgramError, OSError) as e:
        print(f"edge-agent program {args.command}: {e}", file=sys.stderr)
        return 2


def _program_facts(program) -> dict:
    m = program.manifest
    return {"trainer": m.get("trainer"), "model": (m.get("edge") or {}).get("model"),
            "num_classes": m.get("num_classes"), "input_shape": m.get("input_shape"), "graphs": sorted(program.graphs)}


def _list_programs(cache, as_json: bool) -> int:
    from edge_sdk.program.cache import SUFFIX, is_digest
    from edge_sdk.program.format import ProgramError, program_digest, unpack_program
    rows = []
    for path in sorted(cache.directory.glob(f"*{SUFFIX}")):
        row = {"digest": path.stem, "bytes": None}
        try:
            row["bytes"] = path.stat().st_size
            blob = path.read_bytes()
            if not is_digest(path.stem) or program_digest(blob) != path.stem:
                raise ProgramError("the file does not hash to its name (damaged)")
            row.update(_program_facts(unpack_program(blob)))
        except (ProgramError, OSError) as e:
            row["refused"] = str(e)
        rows.append(row)
    if as_json:
        print(json.dumps(rows, indent=1))
        return 0
    if not rows:
        print(f"no edge programs in {cache.directory}", file=sys.stderr)
    for r in rows:
        what = f"refused: {r['refused']}" if "refused" in r else (
            f"{r['trainer']:<10} {r['model']:<14} {r['num_classes']:>4} classes "
            f"{'x'.join(map(str, r['input_shape'])):>9}")
        print(f"{r['digest']}  {what}  {r['bytes'] / 1024:.0f} KB")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["data"]:
        return data_main(argv[1:])
    if argv[:1] == ["program"]:
        return program_main(argv[1:])
    parser = argparse.ArgumentParser(
        prog="edge-agent", formatter_class=HelpFormatter,
        description="edgefl edge agent (FedGKT device daemon). 'edge-agent data check --config agent.yaml' "
                    "checks the device's data; 'edge-agent data export' writes demo shards; 'edge-agent program "
                    "install FILE --config agent.yaml' installs an edge program offline (engine onnxruntime); "
                    "'edge-agent program list --config agent.yaml' lists the cached ones.")
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
