"""Structure-aware fuzzing of the runtime's and the agent's message handlers, with an oracle.

    python -m bench.fuzz --messages 20000 --out docs/bench/fuzz

Every message is a valid one with one thing changed (``tools/fuzzing.py``): one path of its JSON header
mutated (nested thousands deep, a 4,300+ digit integer, NaN/Infinity, a 64 KB+ header, a value of the
wrong type, a long string, a missing field), or its body/framing/content broken. The oracle says which
are invalid; the runtime must reject each invalid one with a named reason (never ``internal_error``),
charged to the device of the topic, with no other effect; nothing may raise out of a handler. Then two
attacks that are about state rather than one message: a per-device flood of never-finished transfers
(an honest device's upload must still land) and retained frames left on uplinks (never handled, cleared).
The agent gets the same treatment for control and downlink frames. The tests run the same generators
for fewer messages (``tests/test_fuzz.py``).
"""
from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud_runtime.config import load_runtime_config
from cloud_runtime.service import CloudRuntime
from edge_sdk import protocol as P
from edge_sdk.agent import build_agent
from edge_sdk.config import AgentConfig
from edgefl_core.data.config import AgentDataConfig
from edgefl_core.transport import MemoryBus
from tools.fuzzing import (DEVICE, HEARTBEAT_DEVICE, REGISTER_DEVICE, RUN, base_downlink_messages, malformed_messages,
                           structured_downlink, structured_uplink, valid_upload_frames)


def fuzz_settings(n: int, seed: int | None):
    return settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None,
                    derandomize=seed is None)


def make_runtime(state_dir: str, bus: MemoryBus | None = None) -> CloudRuntime:
    cfg = load_runtime_config(None, [f"run_id={RUN}", f"state_dir={state_dir}", "validation.quarantine_after=100000000"])
    runtime = CloudRuntime(cfg, (bus or MemoryBus()).client("runtime"))
    for device in (DEVICE, REGISTER_DEVICE, HEARTBEAT_DEVICE):
        runtime.register(device, {"num_classes": 10, "feature_channels": 4, "train_samples": 30})
    for frame in valid_upload_frames():
        runtime.handle(runtime.topics.up(DEVICE), frame)
    assert DEVICE in runtime.strategy.train_uploads
    return runtime


def fuzz_runtime(runtime: CloudRuntime, messages: int, seed: int | None) -> dict:
    """``messages`` structured mutations, then ``messages // 4`` from the older malformed-message generators."""
    stats: Counter = Counter()
    reasons: Counter = Counter()
    failures: list[str] = []
    structured = st.tuples(st.just("structured"), structured_uplink())
    classic = st.tuples(st.just("classic"), malformed_messages().map(lambda m: (m[0], m[1], True, "malformed")))

    def feed(item):
        family, (topic, payload, invalid, what) = item
        stats[family] += 1
        accepted = runtime.strategy.train_uploads.get(DEVICE)
        before = Counter(runtime.registry.rejections)
        try:
            runtime.handle(topic, payload)
        except Exception as e:  # noqa: BLE001 - counting crashes is the point
            stats["crashes"] += 1
            failures.append(f"crash: {what}: {type(e).__name__}: {e}"[:300])
            return
        stats["messages"] += 1
        new = runtime.registry.rejections - before
        rejected = sum(new.values())
        reasons.update(new)
        if invalid:
            stats["invalid"] += 1
            if rejected == 1 and "internal_error" not in new:
                stats["invalid_rejected_with_reason"] += 1
            else:
                failures.append(f"invalid not rejected once with a reason ({dict(new)}): {what}")
            if runtime.strategy.train_uploads.get(DEVICE) is not accepted:
                failures.append(f"an invalid message changed the accepted upload: {what}")
        else:
            stats["maybe_valid"] += 1
            stats["maybe_valid_accepted" if rejected == 0 else "maybe_valid_rejected"] += 1
        if "internal_error" in new:
            failures.append(f"internal_error: {what}")

    start = time.perf_counter()
    fuzz_settings(messages, seed)(given(structured)(feed))()
    fuzz_settings(max(1, messages // 4), seed)(given(classic)(feed))()
    return {**stats, "seconds": round(time.perf_counter() - start, 1), "internal_errors":
            runtime.registry.rejections["internal_error"], "rejections_by_reason": dict(reasons.most_common()),
            "failures": failures[:50], "failure_count": len(failures)}


def flood_and_retained(state_dir: str) -> dict:
    """A per-device flood of half-sent transfers, then an honest upload; retained frames left on uplinks."""
    runtime = make_runtime(state_dir + "/flood")
    for seed in range(2000):  # 2,000 transfers that never finish, each with one 512-byte chunk
        runtime.handle(runtime.topics.up(REGISTER_DEVICE),
                       valid_upload_frames(seed=seed, max_chunk=512)[0].replace(b'"devA"', b'"devR"'))
    runtime.strategy.train_uploads.pop(DEVICE)
    for frame in valid_upload_frames(seed=1):
        runtime.handle(runtime.topics.up(DEVICE), frame)
    flood = {"flood_transfers": 2000, "flooder_rejections": runtime.registry.devices[REGISTER_DEVICE]["rejection_reasons"],
             "flooder_holds_bytes": runtime.ingest.reassembler.held_bytes(REGISTER_DEVICE),
             "honest_upload_accepted": DEVICE in runtime.strategy.train_uploads,
             "honest_rejections": runtime.registry.devices[DEVICE].get("rejection_reasons", {})}
    bus = MemoryBus()
    squatter = bus.client("squatter")
    topics = P.Topics(RUN)
    retained = 0
    for i in range(50):
        device = f"dev{i}"
        squatter.publish(topics.up(device), P.control_frame(P.REGISTER, run=RUN, device=device, round_=-1,
                                                            num_classes=2, feature_channels=1), retain=True)
        squatter.publish(topics.heartbeat(device), P.control_frame(P.HEARTBEAT, run=RUN, device=device, round_=-1),
                         retain=True)
        retained += 2
    fresh = CloudRuntime(load_runtime_config(None, [f"run_id={RUN}", f"state_dir={state_dir}/retained"]),
                         bus.client("runtime"))
    fresh.start()
    fresh.pump(0.05)
    left = sum(1 for t, p in bus._retained.items() if p and ("/up" in t or "/hb" in t))
    return {**flood, "retained_uplink_frames": retained, "retained_handled": fresh.messages_in,
            "retained_left_on_broker": left}


def fuzz_agent(messages: int, seed: int | None, data_dir: Path) -> dict:
    rng = np.random.default_rng(0)
    np.savez(data_dir / "train.npz", images=rng.integers(0, 255, (64, 1, 12, 12), dtype=np.uint8),
             labels=np.arange(64) % 4)
    np.savez(data_dir / "test.npz", images=rng.integers(0, 255, (16, 1, 12, 12), dtype=np.uint8),
             labels=np.arange(16) % 4)
    agent = build_agent(AgentConfig(device_id=DEVICE, run_id=RUN, data=AgentDataConfig("npz", str(data_dir))),
                        transport=MemoryBus().client(DEVICE))
    topic, header, _ = base_downlink_messages("s1")["hello"]
    agent.handle(topic, P.encode_frame(header))
    assert agent.client is not None
    stats: Counter = Counter()
    failures: list[str] = []

    @fuzz_settings(messages, seed)
    @given(structured_downlink())
    def feed(message):
        topic, payload, invalid, what = message
        before, errors = agent.rejected, agent.internal_errors
        try:
            agent.handle(topic, payload)
        except Exception as e:  # noqa: BLE001
            stats["crashes"] += 1
            failures.append(f"crash: {what}: {type(e).__name__}: {e}"[:300])
            return
        stats["messages"] += 1
        if agent.internal_errors != errors:
            failures.append(f"internal error: {what}")
        if invalid:
            stats["invalid"] += 1
            if agent.rejected == before + 1:
                stats["invalid_dropped"] += 1
            else:
                failures.append(f"invalid not dropped: {what}")
        if agent.stop.is_set():
            failures.append(f"stopped the agent: {what}")
            agent.stop.clear()

    start = time.perf_counter()
    feed()
    return {**stats, "seconds": round(time.perf_counter() - start, 1), "internal_errors": agent.internal_errors,
            "failures": failures[:50], "failure_count": len(failures)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=20000,
                        help="structure-aware runtime messages (plus a quarter as many classic ones, and a quarter "
                             "as many structure-aware agent messages)")
    parser.add_argument("--seed", type=int, default=None, help="random examples (default: derandomized)")
    parser.add_argument("--out", default="docs/bench/fuzz")
    args = parser.parse_args(argv)
    logging.disable(logging.CRITICAL)  # hundreds of thousands of rejection warnings
    with tempfile.TemporaryDirectory() as state:
        runtime = fuzz_runtime(make_runtime(state + "/rt"), args.messages, args.seed)
        state_attacks = flood_and_retained(state)
        agent_dir = Path(state) / "data"
        agent_dir.mkdir()
        agent = fuzz_agent(max(1, args.messages // 4), args.seed, agent_dir)
    result = {"command": f"python -m bench.fuzz --messages {args.messages}",
              "structure_aware_messages": runtime.get("structured", 0) + agent.get("messages", 0), "runtime": runtime,
              "state_attacks": state_attacks, "agent": agent}
    ok = (runtime["failure_count"] == 0 and agent["failure_count"] == 0 and not runtime.get("crashes")
          and not agent.get("crashes") and state_attacks["honest_upload_accepted"]
          and state_attacks["retained_handled"] == 0 and state_attacks["retained_left_on_broker"] == 0)
    result["ok"] = ok
    print(json.dumps(result, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "fuzz.json").write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
