"""Long fuzz run of the runtime's message handler (the tests run the same generators for 2,500 messages).

    python -m bench.fuzz --messages 20000 --out docs/bench/fuzz

Feeds malformed uplink messages (tools/fuzzing.py) to a real CloudRuntime (in-memory transport) holding
one accepted upload; counts rejections by reason, crashes (exceptions out of the handler) and silent
acceptances, and checks the accepted upload was never replaced.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import Counter
from pathlib import Path

from hypothesis import HealthCheck, given, settings

from cloud_runtime.config import load_runtime_config
from cloud_runtime.service import CloudRuntime
from edgefl_core.transport import MemoryBus
from tools.fuzzing import RUN, malformed_messages, valid_upload_frames


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000)
    parser.add_argument("--out", default="docs/bench/fuzz")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={state}", "validation.quarantine_after=100000000"])
        runtime = CloudRuntime(cfg, MemoryBus().client("runtime"))
        runtime.register("devA", {"num_classes": 10, "feature_channels": 4, "train_samples": 30})
        for frame in valid_upload_frames():
            runtime.handle(runtime.topics.up("devA"), frame)
        accepted = runtime.strategy.train_uploads["devA"]
        stats = Counter()

        @settings(max_examples=args.messages, deadline=None, suppress_health_check=list(HealthCheck),
                  database=None)
        @given(malformed_messages())
        def feed(message):
            before = sum(runtime.registry.rejections.values())
            try:
                runtime.handle(*message)
            except Exception:  # noqa: BLE001 - counting crashes is the point
                stats["crashes"] += 1
                return
            stats["messages"] += 1
            if sum(runtime.registry.rejections.values()) != before + 1:
                stats["not_rejected"] += 1

        start = time.perf_counter()
        feed()
        seconds = time.perf_counter() - start
        result = {"messages": stats["messages"] + stats["crashes"], "crashes": stats["crashes"],
                  "not_rejected": stats["not_rejected"], "accepted_upload_untouched": runtime.strategy.train_uploads["devA"] is accepted,
                  "internal_errors": runtime.registry.rejections["internal_error"], "seconds": seconds,
                  "rejections_by_reason": dict(runtime.registry.rejections.most_common())}
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
