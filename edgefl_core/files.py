"""Small file helpers shared by the agent and the runtime."""
from __future__ import annotations

import time
from pathlib import Path


def move_aside(directory: str | Path) -> Path | None:
    """Rename ``directory`` to ``<name>.old-<UTC time>`` so the next start finds none (``--reset-state``);
    nothing is deleted, so an operator can move it back. Returns the new path, or None when the directory
    is missing or empty."""
    path = Path(directory)
    if not path.is_dir() or not any(path.iterdir()):
        return None
    aside = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    n = 1
    while aside.exists():  # two resets in one second
        aside, n = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{n}"), n + 1
    path.rename(aside)
    return aside
