"""Does an open console slow ingest, and does it answer in time with 1,000 devices? (docs/CONSOLE.md)

    python -m bench.console_load --agents 1000 --trials 5 --out docs/bench/console

Runs the fleet load generator (``tools/loadgen.py``: 1,000 protocol-only agents, real paho clients,
a private mosquitto, the real runtime) ``--trials`` times with the console closed and ``--trials``
times with it open, interleaved (closed, open, closed, open, ...) so drift on this shared machine
falls on both alike. "Open" is what an operator's browser tab does, twice as often: ``/api/status``
and a page of ``/api/devices`` every second, the page and a Prometheus scrape every 5 s, from
another process. Prints each trial, the medians and spreads of runtime messages/s, their ratio,
and the console's answer latencies; writes ``console_load.json`` and ``console_load.png``.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from bench.plots import save_figure


def summarize(trials: list[dict]) -> dict:
    closed = [t["messages_per_s"] for t in trials if not t["console"]]
    opened = [t["messages_per_s"] for t in trials if t["console"]]
    answers: dict[str, list[float]] = {}
    for t in trials:
        for name, lat in (t.get("console_latency") or {}).items():
            if isinstance(lat, dict) and lat.get("max_s") is not None:
                answers.setdefault(name, []).append(lat["max_s"])
    med_closed, med_open = statistics.median(closed), statistics.median(opened)
    return {
        "messages_per_s_closed": {"median": med_closed, "min": min(closed), "max": max(closed), "trials": closed},
        "messages_per_s_open": {"median": med_open, "min": min(opened), "max": max(opened), "trials": opened},
        "open_over_closed": med_open / med_closed,
        "spread_closed": (max(closed) - min(closed)) / med_closed,
        "worst_answer_s": {name: max(v) for name, v in answers.items()},
        "lost_uploads": sum(t["lost_uploads"] for t in trials),
        "console_errors": sum((t.get("console_latency") or {}).get("errors", 0) for t in trials),
    }


def plot(trials: list[dict], summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for flag, color, label in ((False, "#69707d", "console closed"), (True, "#2b6cb0", "console open")):
        xs = [i for i, t in enumerate(trials) if t["console"] == flag]
        a.plot(xs, [trials[i]["messages_per_s"] for i in xs], "o", color=color, label=label)
        a.axhline(summary[f"messages_per_s_{'open' if flag else 'closed'}"]["median"], color=color, lw=1, ls="--")
    a.set(xlabel="trial (interleaved)", ylabel="runtime messages/s", title=f"ingest with {trials[0]['agents']} agents "
          f"(open/closed = {summary['open_over_closed']:.3f})")
    a.legend()
    names = sorted(summary["worst_answer_s"])
    b.bar(names, [summary["worst_answer_s"][n] for n in names], color="#2b6cb0")
    b.axhline(1.0, color="#c53030", ls="--", lw=1, label="1 s")
    b.set(ylabel="slowest answer over all open trials (s)", title="console answers under load")
    b.legend()
    save_figure(fig, path)


def main() -> None:
    from edgefl_cli.logs import setup_logging
    from tools.loadgen import run_load
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--trials", type=int, default=5, help="per setting (>= 5 for the median and spread)")
    parser.add_argument("--out", default="docs/bench/console")
    args = parser.parse_args()
    setup_logging("WARNING")
    trials = []
    for i in range(2 * args.trials):
        console = i % 2 == 1
        start = time.perf_counter()
        r = run_load(args.agents, args.workers, heartbeats=3, state_dir=f"/tmp/edgefl-console-load-{i}", console=console)
        trials.append({"trial": i, "console": console, "agents": args.agents, "messages_per_s": r["messages_per_s"],
                       "messages": r["messages_handled"], "seconds": r["seconds"], "lost_uploads": r["lost_uploads"],
                       "ack_p99_s": r["ack_latency_s"]["p99"], "console_latency": r.get("console"),
                       "wall_s": time.perf_counter() - start})
        t = trials[-1]
        answers = "" if not console else "  slowest answers: " + ", ".join(
            f"{k} {v['max_s']:.3f} s" for k, v in r["console"].items() if isinstance(v, dict) and v["max_s"] is not None)
        print(f"trial {i}: console {'open  ' if console else 'closed'} {t['messages_per_s']:7.1f} msgs/s, "
              f"{t['lost_uploads']} lost, ACK p99 {t['ack_p99_s']:.2f} s{answers}", flush=True)
    summary = summarize(trials)
    print(json.dumps(summary, indent=2))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "console_load.json").write_text(json.dumps({"command": "python -m bench.console_load "
                                                       f"--agents {args.agents} --trials {args.trials}",
                                                       "summary": summary, "trials": trials}, indent=2))
    plot(trials, summary, out / "console_load.png")


if __name__ == "__main__":
    main()
