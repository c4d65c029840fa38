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


def busy_cores(interval_s: float = 0.5) -> float:
    """Cores of this process's affinity mask that other processes kept busy over the next ``interval_s`` seconds
    (/proc/stat's per-CPU busy time, less this process's own CPU time): a job started beside another sizes its
    thread pools to what is left. 0.0 where /proc/stat is not there (not Linux)."""
    import time

    def sample() -> dict[str, int] | None:
        try:
            with open("/proc/stat") as f:
                lines = [line.split() for line in f if line.startswith("cpu") and not line.startswith("cpu ")]
        except OSError:
            return None
        # busy = all jiffies but idle and iowait (fields 4 and 5 after the name)
        return {f[0]: sum(map(int, f[1:])) - int(f[4]) - int(f[5]) for f in lines}

    try:
        mine = {f"cpu{c}" for c in os.sched_getaffinity(0)}
    except AttributeError:
        return 0.0
    before, own_before = sample(), os.times()
    time.sleep(interval_s)
    after, own_after = sample(), os.times()
    if before is None or after is None:
        return 0.0
    ticks = os.sysconf("SC_CLK_TCK")
    busy = sum(after[c] - before.get(c, after[c]) for c in mine if c in after) / ticks
    own = (own_after.user - own_before.user) + (own_after.system - own_before.system)
    return max(0.0, (busy - own) / interval_s)


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
