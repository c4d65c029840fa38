"""What every benchmark's PNG ends with: a tight layout, the file, the figure closed (a bench that plots
several results must not keep every figure's memory)."""
from __future__ import annotations

from pathlib import Path


def save_figure(fig, path: str | Path, dpi: int = 110) -> None:
    """Lay out ``fig`` tightly, write it to ``path`` (PNG at ``dpi``) and close it."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
