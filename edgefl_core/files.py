"""Small file helpers shared by the agent and the runtime."""
from __future__ import annotations

import time
from pathlib import Path

from edgefl_core.config import ConfigError


def move_aside(directory: str | Path, keep: tuple[str | Path | None, ...] = ()) -> Path | None:
    """Rename ``directory`` to ``<name>.old-<UTC time>`` so the next start finds none (``--reset-state``);
    nothing is deleted, so an operator can move it back. Returns the new path, or None when the directory
    is missing or empty. Raises ConfigError when it is not a plain directory, or when it holds any of ``keep``
    (the config file, the data: ``state_dir: .`` must never move a device's bundle)."""
    if not str(directory).strip():
        raise ConfigError("state_dir is empty: nothing to reset")
    path = Path(directory)
    if path.is_symlink():
        raise ConfigError(f"--reset-state: state_dir {path} is a symbolic link; move what it points to aside "
                          "yourself")
    if not path.exists():
        return None
    if not path.is_dir():
        raise ConfigError(f"--reset-state: state_dir {path} is not a directory")
    resolved = path.resolve()
    for kept in keep:
        if kept is not None and (resolved == Path(kept).resolve() or resolved in Path(kept).resolve().parents):
            raise ConfigError(f"--reset-state: state_dir {path} holds {kept}; give the state its own folder "
                              "(state_dir: state) and move the old state files aside by hand")
    if not any(path.iterdir()):
        return None
    stamp = time.strftime('%Y%m%d-%H%M%S', time.gmtime())
    aside, n = path.with_name(f"{path.name}.old-{stamp}"), 1
    while aside.exists():  # two resets in one second
        aside, n = path.with_name(f"{path.name}.old-{stamp}-{n}"), n + 1
    try:
        path.rename(aside)
    except OSError as e:  # a mount point, no permission, ...
        raise ConfigError(f"--reset-state: cannot move {path} aside ({e.strerror or e}); move or empty it "
                          "yourself") from None
    return aside
