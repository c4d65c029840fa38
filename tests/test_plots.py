"""The run plots with few rounds: integer round ticks, and a one-point line still shows (markers)."""
import pytest

from cloud_runtime import plots


@pytest.fixture
def figures(monkeypatch):
    """Every figure a plot function saves, kept open for inspection."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = []

    def save(fig, path):
        kept.append(fig)
        fig.savefig(path)
        return path

    monkeypatch.setattr(plots, "_save", save)
    yield kept
    for fig in kept:
        plt.close(fig)


def report(rounds):
    rows = [{"round": r, "test_accuracy": 0.3 + 0.1 * r, "bytes_up": {"dev0": 1e6, "dev1": 2e6},
             "per_device": {"dev0": {"accuracy": 0.3}, "dev1": {"accuracy": 0.4}},
             "divergence": {"stem.0.weight": 0.1, "head.0.conv1.weight": 0.2, "fc.weight": 0.3}} for r in range(rounds)]
    return {"run": {"name": "tiny"}, "rounds": rows, "final": {"upload_compression_ratio": 4.0}}


@pytest.mark.parametrize("rounds", [1, 2, 3])
@pytest.mark.parametrize("plot", [plots.plot_accuracy, plots.plot_bytes])
def test_round_axes_have_integer_ticks(figures, tmp_path, rounds, plot):
    assert plot(report(rounds), tmp_path / "p.png").exists()
    ax = figures[-1].axes[0]
    lo, hi = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
    if plot is plots.plot_bytes:  # each round's group of bars is centred on its tick
        centres = sorted({round(p.get_x() + p.get_width() / 2, 6) for p in ax.patches})
        assert abs(sum(centres) / len(centres) - (rounds - 1) / 2) < 1e-6


def test_one_round_lines_are_visible(figures, tmp_path):
    plots.plot_accuracy(report(1), tmp_path / "acc.png")
    lines = figures[-1].axes[0].get_lines()
    assert len(lines) == 3  # two devices and the pooled accuracy
    assert all(line.get_marker() not in (None, "", "None", " ") for line in lines)
    plots.plot_divergence(report(1), tmp_path / "div.png")
    ax = figures[-1].axes[0]
    assert all(line.get_marker() not in (None, "", "None", " ") for line in ax.get_lines())
    lo, hi = ax.get_xlim()
    assert all(float(t).is_integer() for t in ax.get_xticks() if lo <= t <= hi)
