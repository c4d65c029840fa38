"""The cloud's commands need torch (the ``cloud`` extra); a torch-free device install has none of it."""
from __future__ import annotations

import importlib.util
import sys


def require_torch(command: str) -> None:
    """Exit 2 with what to install, instead of a ModuleNotFoundError traceback, when torch is missing."""
    if importlib.util.find_spec("torch") is None:
        sys.stderr.write(f"{command}: needs torch and the 'cloud' extra (this looks like a device's torch-free "
                         "install): pip install torch==2.13.0, then this package with [cloud] (README)\n")
        raise SystemExit(2)
