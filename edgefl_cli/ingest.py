"""``cloud-ingest``: one ingest worker of a run with ``ingest.workers`` > 0 (``cloud_runtime/ingest_worker.py``).

    cloud-ingest --config runtime.yaml --shard 0      # (python -m edgefl_cli.ingest ...)

``cloud-runtime serve`` starts its workers itself unless ``ingest.spawn`` is false; run this on other machines
(or under a process manager) otherwise, one process per shard in [0, ingest.workers). Torch-free. SIGTERM and
Ctrl-C stop it; what it held is asked for again by the devices, from the worker that replaces it.

Exit status: 0 stopped; 2 a configuration error; 3 another worker of the same shard logged in and took over this
one's broker session (MQTT 5 reason code 0x8E): one worker per shard, the newer one serves it.
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys

from cloud_runtime.config import load_runtime_config
from cloud_runtime.ingest_worker import TAKEN_OVER_EXIT, IngestWorker, check_shard, new_instance, presence
from edgefl_cli.logs import HelpFormatter, add_config_options, setup_logging
from edgefl_core.config import ConfigError
from edgefl_core.transport import create_transport
from edgefl_core.wire import Topics

logger = logging.getLogger("edgefl.ingest")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cloud-ingest", formatter_class=HelpFormatter,
                                     description="One ingest worker of a run: reassembles, checksums and decompresses "
                                                 "the uploads of its shard of devices and forwards them to the "
                                                 "coordinator (cloud-runtime serve). docs/DEPLOYMENT.md")
    parser.add_argument("--config", required=True, help="the run's runtime YAML (the coordinator's)")
    parser.add_argument("--shard", type=int, required=True, help="this worker's shard, in [0, ingest.workers)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="stop when this process is gone (set by cloud-runtime serve for the workers it spawns)")
    add_config_options(parser, "ingest.workers=2")
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    try:
        cfg = load_runtime_config(args.config, args.overrides)
        check_shard(cfg, args.shard)   # before its account is looked up
        # a client id of its own per shard, with a persistent session: chunks queue at the broker while it restarts
        instance = new_instance()
        transport = create_transport(cfg.ingest.broker_for(cfg.broker, args.shard),
                                     f"edgefl-ingest-{cfg.run_id}-{args.shard}", will=(
            Topics(cfg.run_id).ingest_status(args.shard),
            presence(cfg.run_id, args.shard, "offline", cfg.ingest.workers, instance)))
        worker = IngestWorker(cfg, transport, args.shard, instance)
    except (ConfigError, ValueError) as e:
        logger.error("%s", e)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: worker.stop.set())
    signal.signal(signal.SIGINT, lambda *_: worker.stop.set())
    try:
        worker.serve(args.parent_pid)
    except ConfigError as e:  # the broker refused this worker's account, or its certificate: no retry fixes that
        account = cfg.ingest.broker_for(cfg.broker, args.shard).username
        logger.error("ingest worker %d: %s. This worker logs in as %r%s (cloud-runtime provision --ingest-workers "
                     "N creates the accounts; restart mosquitto after provisioning)", args.shard, e, account,
                     f" with ingest.passwords[{args.shard}]" if cfg.ingest.passwords else " with broker.password")
        return 2
    finally:
        worker.close()
    logger.info("ingest worker %d stopped: %d messages, %d transfers forwarded, %d chunks refused", args.shard,
                worker.messages_in, worker.forwarded, worker.refused)
    return TAKEN_OVER_EXIT if worker.taken_over else 0


if __name__ == "__main__":
    sys.exit(main())
