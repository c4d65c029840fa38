"""Facts about this process that both daemons report."""
from __future__ import annotations

import os
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


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask: a container's or taskset's limit, not the host's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_plan(cores: int, agents: int, mode: str, runtime_threads: int | None = None,
                agent_threads: int | None = None, overlap_evaluation: bool = True) -> tuple[int, int]:
    """(runtime, agent) intra-op threads for one runtime and ``agents`` agent processes sharing ``cores``,
    never more busy threads than cores by default (a thread pool that shares its cores with other busy
    processes spins at every barrier: a 2-thread server step ran 14.7x slower than 1 thread that way).

    ``sync``: the devices idle while the server trains, and the server idles while they train but for its
    overlapped evaluation (``overlap_evaluation``: one thread, so the agents share the other cores), so the
    runtime takes every core and each agent its share. ``async``: all of them compute at once, so each process
    gets an equal share. A value given explicitly is kept."""
    cores, agents = max(1, cores), max(1, agents)
    if mode == "async":
        share = max(1, cores // (agents + 1))
        return runtime_threads or share, agent_threads or share
    free = cores - 1 if overlap_evaluation and cores > 1 else cores
    return runtime_threads or cores, agent_threads or max(1, free // agents)
