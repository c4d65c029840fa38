"""Run reports on disk: ``report.json`` written atomically, and the PNG plots every run produces."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np


def jsonable(obj):
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        value = float(obj)
        return value if math.isfinite(value) else None
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    return obj


def write_json(path: str | Path, payload: dict) -> Path:
    """Write atomically (temp file + rename) so a reader never sees half a report."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(jsonable(payload), indent=2))
    tmp.replace(path)
    return path


def _integer_x(ax) -> None:
    """Integer ticks only on the x axis (rounds, layers): a run of 2 rounds must not show round 0.5, and
    one of a single round shows that round's number (not -0.04 ... 0.04)."""
    from matplotlib.ticker import MaxNLocator
    lo, hi = ax.get_xlim()
    if hi - lo < 1:
        ax.set_xlim((lo + hi) / 2 - 0.5, (lo + hi) / 2 + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))


def _save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    import matplotlib.pyplot as plt
    plt.close(fig)
    return Path(path)


def plot_accuracy(report: dict, path: str | Path) -> Path | None:
    """Test accuracy per round: pooled, plus each device's (extractor -> server) accuracy."""
    rounds = [r for r in report.get("rounds", []) if r.get("test_accuracy") is not None]
    if not rounds:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    xs = [r["round"] for r in rounds]
    devices = sorted({d for r in rounds for d in (r.get("per_device") or {})})
    for device in devices:
        ys = [(r.get("per_device") or {}).get(device, {}).get("accuracy") for r in rounds]
        # markers: a run of one evaluated round is one point per line, invisible as a line alone
        ax.plot(xs, ys, lw=0.8, alpha=0.5, marker="o", ms=3, label=device if len(devices) <= 8 else None)
    ax.plot(xs, [r["test_accuracy"] for r in rounds], "k-o", lw=2, label="all test samples")
    _integer_x(ax)
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title(report.get("run", {}).get("name", "run"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_bytes(report: dict, path: str | Path) -> Path | None:
    """Upload megabytes per device per round (MQTT runs)."""
    rounds = [r for r in report.get("rounds", []) if r.get("bytes_up")]
    if not rounds:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    devices = sorted({d for r in rounds for d in r["bytes_up"]})
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    xs = np.array([r["round"] for r in rounds], dtype=float)
    width = 0.8 / max(len(devices), 1)
    for i, device in enumerate(devices):  # each round's bars centred on its (integer) tick
        ax.bar(xs + (i - (len(devices) - 1) / 2) * width, [r["bytes_up"].get(device, 0) / 1e6 for r in rounds],
               width, label=device)
    _integer_x(ax)
    ax.set_xlabel("round")
    ax.set_ylabel("upload MB")
    ratio = report.get("final", {}).get("upload_compression_ratio")
    ax.set_title(f"uploads per device ({ratio:.1f}x smaller than fp32)" if ratio else "uploads per device")
    ax.legend(fontsize=7, ncol=4, loc="lower center")
    ax.grid(alpha=0.3, axis="y")
    return _save(fig, path)


def plot_divergence(report: dict, path: str | Path) -> Path | None:
    """Layer-wise client divergence (eq. 1 of Wang et al., "Unlocking the Potential of Federated Learning for
    Deeper Models", arXiv:2306.02701: mean over clients of the RMS difference to the average) per weight tensor
    in model order, one line per round: FedAvg's models, or FedGKT's extractors when they are averaged."""
    rounds = [r for r in report.get("rounds", []) if r.get("divergence")]
    if not rounds:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in rounds[0]["divergence"] if n.endswith("weight") and "bn" not in n and ".1.weight" not in n]
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=120)
    for r in rounds:
        ax.plot(range(len(names)), [r["divergence"][n] for n in names], lw=1, marker="o", ms=3,
                label=f"round {r['round']}")
    _integer_x(ax)
    ax.set_xlabel("layer (conv/linear weights, input to output)")
    ax.set_ylabel("mean_k sqrt(||w_k - w_avg||^2 / d)")
    ax.set_title("layer-wise client divergence (eq. 1, deeper-models FL study)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
