"""Facts about this process that both daemons report."""
from __future__ import annotations

import resource


def peak_rss_mb() -> float:
    """Peak resident memory of this process image in MB: /proc's VmHWM on Linux. Not getrusage's ru_maxrss
    there: Linux carries it across fork and execve, so an agent started by a large parent (a simulator with
    torch loaded) would report the parent's peak. Elsewhere ru_maxrss (KiB on Linux, bytes on macOS)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    import sys
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024.0 * 1024.0) if sys.platform == "darwin" else peak / 1024.0
