"""Run a whole experiment: partition the data, write typed runtime and agent configs, run them, report.

One engine: ``--transport mqtt`` starts a private mosquitto on a free loopback port (or uses
``--broker``), one ``cloud-runtime`` process and one ``edge-agent`` process per device;
``--transport memory`` runs the very same :class:`CloudRuntime` and :class:`EdgeAgent` objects in
threads of this process over the in-memory bus (``memory://``). Every feature (FedAvg, async mode,
codecs, validation, quarantine) works in both, and both write the same ``report.json``.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import yaml

from cloud_runtime.config import ExperimentConfig, IngestConfig, RuntimeConfig
from cloud_runtime.plots import plot_accuracy, plot_bytes, plot_divergence, write_json
from edge_sdk.config import AgentConfig, UploadConfig
from edgefl_cli.interrupt import EXIT_INTERRUPTED
from edgefl_cli.mosquitto import EmbeddedMosquitto
from edgefl_core.data import federated
from edgefl_core.data.config import AgentDataConfig
from edgefl_core.proc import busy_cores, thread_plan, usable_cores
from edgefl_core.transport.config import BrokerConfig

logger = logging.getLogger("edgefl.sim")

STOP_GRACE_S = 60.0  # interrupted: how long the runtime may take to save the rounds done and write its report


@dataclass
class Deployment:
    """What :func:`write_deployment` wrote: typed configs, their files, and each device's class counts."""

    runtime: RuntimeConfig
    runtime_path: Path
    agents: list[AgentConfig]
    agent_paths: list[Path]
    class_counts: dict[str, list[int]]


def run_id_of(cfg: ExperimentConfig) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in cfg.run.name) or "run"


def free_cores() -> tuple[int, float]:
    """(cores the run may use, cores other processes kept busy as it started): this process's cores less the
    whole ones other processes are using (:func:`edgefl_core.proc.busy_cores`), at least 1. A pool of 2 threads
    beside a process that keeps one of 2 cores busy trained at 7 samples/s where 1 thread trains at ~200."""
    cores, busy = usable_cores(), busy_cores()
    return max(1, cores - int(busy + 0.5)), busy


def threads_of(cfg: ExperimentConfig, cores: int | None = None) -> tuple[int, int]:
    """(runtime, per agent) torch threads: ``run.threads`` / ``deployment.agent_threads`` where set, else from
    ``cores`` (default: the cores this process may use) and the processes sharing them
    (:func:`edgefl_core.proc.thread_plan`)."""
    return thread_plan(cores or usable_cores(), cfg.run.devices, cfg.deployment.mode, cfg.run.threads,
                       cfg.deployment.agent_threads, cfg.fedgkt.overlap_evaluation and cfg.algorithm == "fedgkt")


def rank_threads(cfg: ExperimentConfig, cores: int | None = None) -> int:
    """The runtime's threads per process: with ``deployment.server_ranks`` ranks, each rank's share of the plan's
    runtime threads (``run.threads``, when set, is per rank)."""
    runtime = threads_of(cfg, cores)[0]
    if cfg.run.threads is None and cfg.deployment.server_ranks > 1:
        return max(1, runtime // cfg.deployment.server_ranks)
    return runtime


def runtime_command(cfg: ExperimentConfig, runtime_path: Path, log_level: str) -> list[str]:
    """How the simulator starts the cloud runtime: one process, or ``deployment.server_ranks`` ranks under
    torchrun on this machine (``--standalone``: a free port for the rendezvous; ``--max-restarts``:
    ``deployment.rank_restarts``)."""
    serve = ["-m", "edgefl_cli.runtime", "serve", "--config", str(runtime_path), "--log-level", log_level]
    ranks = cfg.deployment.server_ranks
    if ranks == 1:
        return [sys.executable, *serve]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(ranks),
            "--max-restarts", str(cfg.deployment.rank_restarts), *serve]


def log_thread_plan(cfg: ExperimentConfig, cores: int | None = None, busy: float = 0.0) -> None:
    """Say how the cores are shared, and warn where explicit settings oversubscribe them."""
    cores = cores or usable_cores()
    runtime, agent = threads_of(cfg, cores)
    n = cfg.run.devices
    ranks = cfg.deployment.server_ranks
    logger.info("threads: runtime %s, each of %d agents %d, on %d cores (%s rounds)%s",
                runtime if ranks == 1 else f"{ranks} ranks of {rank_threads(cfg, cores)}", n, agent, cores,
                cfg.deployment.mode, f"; {usable_cores() - cores} more kept busy by other processes ({busy:.1f} "
                "cores) as the run started" if cores < usable_cores() else "")
    # a pool of more than one thread collapses when other busy threads share its cores; single-thread processes
    # only take turns. Sync rounds: the runtime computes while the agents wait, and the other way round
    if cfg.deployment.mode == "async":
        busy, pooled = runtime + n * agent, runtime > 1 or agent > 1
    else:
        busy, pooled = max(runtime, n * agent), runtime > cores or (agent > 1 and n * agent > cores)
    if busy > cores and pooled:
        logger.warning("threads: %d busy threads on %d cores (run.threads=%s, deployment.agent_threads=%s): thread "
                       "pools that share cores with other busy processes slow down many times over; leave both null "
                       "to derive them from the cores", busy, cores, cfg.run.threads, cfg.deployment.agent_threads)


def runtime_config(cfg: ExperimentConfig, broker_url: str, state_dir: Path, eval_ids: Path,
                   data: federated.FederatedData, cores: int | None = None) -> RuntimeConfig:
    """The runtime's side of an experiment (the run's algorithm, rounds, server and deployment settings)."""
    dep = cfg.deployment
    return RuntimeConfig(
        run_id=run_id_of(cfg), algorithm=cfg.algorithm, fedavg=cfg.fedavg, fedgkt=cfg.fedgkt,
        eval_data=AgentDataConfig(cfg.data.dataset, cfg.data.path, str(eval_ids)), edge=cfg.edge, codec=dep.codec,
        broker=BrokerConfig(url=broker_url), server=cfg.server, mode=dep.mode, rounds=cfg.run.rounds,
        min_devices=cfg.run.devices, expected_devices=cfg.run.devices, registration_timeout_s=300.0,
        round_deadline_s=dep.round_deadline_s, quorum=dep.quorum, eval_every=cfg.run.eval_every,
        max_staleness=dep.max_staleness, state_dir=str(state_dir), threads=rank_threads(cfg, cores), seed=cfg.run.seed,
        num_classes=data.num_classes, input_shape=list(data.image_shape), privacy=cfg.privacy,
        ingest=IngestConfig(workers=dep.ingest_workers),
        console=replace(cfg.console, token_file=str(Path(cfg.console.token_file).resolve()) if cfg.console.token_file
                        else None))


def agent_config(cfg: ExperimentConfig, index: int, broker_url: str, ids_file: Path, state_dir: Path,
                 cores: int | None = None) -> AgentConfig:
    """Device ``dev<index>``: identity, broker, its data, link and engine (how it trains comes from the runtime)."""
    dep = cfg.deployment
    profiles = dep.device_profiles
    return AgentConfig(
        device_id=f"dev{index}", run_id=run_id_of(cfg), broker=BrokerConfig(url=broker_url),
        data=AgentDataConfig(cfg.data.dataset, cfg.data.path, str(ids_file)),
        upload=UploadConfig(chunk_bytes=dep.chunk_bytes),
        state_dir=str(state_dir), threads=threads_of(cfg, cores)[1], seed=cfg.run.seed + index,
        engine=dep.agent_engine if dep.agent_engine != "mixed" else ("torch", "onnxruntime")[index % 2],
        profile=profiles[index % len(profiles)] if profiles else "host")


def _dump(path: Path, config) -> Path:
    path.write_text(yaml.safe_dump(asdict(config), sort_keys=False))
    return path


def write_deployment(cfg: ExperimentConfig, out_dir: Path, broker_url: str) -> Deployment:
    """Partition the data; write ``runtime.yaml`` and ``agents/<dev>/agent.yaml`` (+ sample-id files). Paths
    in them are absolute: a config's relative paths are read against its own folder, not the current one."""
    out_dir = Path(out_dir).resolve()
    if cfg.data.path:
        cfg = replace(cfg, data=replace(cfg.data, path=str(Path(cfg.data.path).resolve())))
    data = federated.prepare(cfg.data, cfg.run.devices, cfg.run.seed, out_dir)
    cores, busy = free_cores()  # measured once: every process of the run gets the same plan
    log_thread_plan(cfg, cores, busy)
    eval_ids = out_dir / "eval_sample_ids.json"
    eval_ids.write_text(json.dumps({"train": [], "test": data.test_all.sample_ids.tolist()}))
    runtime = runtime_config(cfg, broker_url, out_dir / "runtime", eval_ids, data, cores)
    agents, agent_paths = [], []
    for d in range(cfg.run.devices):
        device_dir = out_dir / "agents" / f"dev{d}"
        device_dir.mkdir(parents=True, exist_ok=True)
        ids_file = device_dir / "sample_ids.json"
        ids_file.write_text(json.dumps({"train": data.train[d].sample_ids.tolist(),
                                        "test": data.test[d].sample_ids.tolist()}))
        agents.append(agent_config(cfg, d, broker_url, ids_file, device_dir / "state", cores))
        agent_paths.append(_dump(device_dir / "agent.yaml", agents[-1]))
    counts = {f"dev{d}": data.train_class_counts[d].tolist() for d in range(cfg.run.devices)}
    return Deployment(runtime, _dump(out_dir / "runtime.yaml", runtime), agents, agent_paths, counts)


def _fresh_out_dir(cfg: ExperimentConfig, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in ("runtime", "agents", "broker", "logs"):  # a new simulation, not a resume of the last one
        if (out_dir / stale).exists():
            shutil.rmtree(out_dir / stale)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(asdict(cfg), sort_keys=False))
    (out_dir / "logs").mkdir(exist_ok=True)
    return out_dir


def _finish_report(cfg: ExperimentConfig, out_dir: Path, deployment: Deployment, start: float, lingered_s: float = 0.0,
                   **run) -> dict | None:
    """The runtime's report, plus what only the simulator knows (class counts, wall time: without the
    ``lingered_s`` the console stayed up after the run); plots. Interrupted (``run["interrupted"]``): the same
    of the rounds done, or None when the runtime wrote no report."""
    runtime_report = out_dir / "runtime" / "report.json"
    if run.get("interrupted") and not runtime_report.exists():
        logger.warning("interrupted before the runtime wrote a report: no report.json")
        return None
    report = json.loads(runtime_report.read_text())
    report["run"].update(name=cfg.run.name, codec=cfg.deployment.codec, edge_model=cfg.edge.model,
                         agents=len(deployment.agents), **run)
    for device, counts in deployment.class_counts.items():
        report["devices"].setdefault(device, {})["class_counts"] = counts
    report["final"]["wall_seconds"] = time.perf_counter() - start - lingered_s
    write_json(out_dir / "report.json", report)
    plot_accuracy(report, out_dir / "accuracy.png")
    plot_bytes(report, out_dir / "uploads.png")
    plot_divergence(report, out_dir / "divergence.png")
    final = report["final"]
    if run.get("interrupted"):
        logger.warning("interrupted after %d of %d rounds: partial report %s (test accuracy %s)", final["rounds"],
                       cfg.run.rounds, out_dir / "report.json", final.get("test_accuracy"))
        return report
    logger.info("final test accuracy %s over %s in %.0fs; upload %.1f MB, %.1fx smaller than fp32; report: %s",
                final.get("test_accuracy"), report["run"]["transport"], final["wall_seconds"],
                final["bytes_up"] / 1e6, final["upload_compression_ratio"], out_dir / "report.json")
    return report


# ---------------------------------------------------------------------------------------------
# memory: the real runtime and agents as threads of this process


def run_in_memory(cfg: ExperimentConfig, out_dir: Path, stop: threading.Event | None = None) -> dict | None:
    """The same runtime and agents as over MQTT, in threads, over a private ``memory://`` bus.

    ``stop`` (Ctrl-C): the runtime stops cleanly (saves the rounds done), the agents stop, and the report of
    the rounds done is written and returned with ``run.interrupted`` (None when there is none yet)."""
    from cloud_runtime.console import start_console
    from cloud_runtime.service import build_runtime
    from edge_sdk.agent import build_agent

    stop = stop or threading.Event()
    out_dir = _fresh_out_dir(cfg, out_dir)
    start = time.perf_counter()
    deployment = write_deployment(cfg, out_dir, f"memory://{uuid.uuid4().hex[:8]}")
    if stop.is_set():
        return None
    if deployment.runtime.ingest.workers:  # processes on a broker: in memory the runtime ingests alone
        logger.warning("deployment.ingest_workers=%d is ignored with --transport memory: the runtime ingests alone",
                       deployment.runtime.ingest.workers)
        deployment.runtime.ingest = IngestConfig()
    runtime = build_runtime(deployment.runtime)
    console = start_console(runtime)  # logs its address
    agents = [build_agent(a) for a in deployment.agents]  # built in order: seeded initial models
    errors: list[BaseException] = []

    def worker(body):
        def run():  # torch has one thread pool per process: the runtime and agents each set theirs to compute
            try:
                body()
            except BaseException as e:  # surfaced after join
                if stop.is_set():  # stopping (Ctrl-C): said in one line, the run's report is still written
                    logger.warning("a simulation thread stopped with %s: %s", type(e).__name__, e)
                    return
                logger.exception("simulation thread failed")
                errors.append(e)
                runtime.stop.set()
        return threading.Thread(target=run, daemon=True)

    def agent_body(agent):
        def body():
            agent.start()
            try:
                agent.serve()
            finally:
                agent.shutdown()
        return body

    threads = [worker(runtime.serve)] + [worker(agent_body(a)) for a in agents]
    logger.info("in memory: 1 runtime + %d agents as threads over %s", len(agents), deployment.runtime.broker.url)
    for t in threads:
        t.start()
    deadline = time.monotonic() + cfg.deployment.timeout_s
    while threads[0].is_alive() and not stop.is_set() and time.monotonic() < deadline:
        threads[0].join(0.2)
    interrupted = stop.is_set()
    if interrupted:  # the runtime saves the rounds done, writes its report.json, and returns
        runtime.stop.set()
        threads[0].join(STOP_GRACE_S)
        if threads[0].is_alive():
            logger.warning("the runtime did not stop within %.0fs: reporting its last saved round", STOP_GRACE_S)
    elif threads[0].is_alive():
        runtime.stop.set()
        if console is not None:
            console.stop()
        raise RuntimeError(f"the run did not finish within {cfg.deployment.timeout_s:.0f}s")
    for agent in agents:
        agent.stop.set()
    for t in threads[1:]:
        t.join(10 if interrupted else 60)
    try:
        if errors and not interrupted:
            raise RuntimeError(f"a simulation thread failed: {type(errors[0]).__name__}: {errors[0]}")
        run = {"interrupted": True} if interrupted else {}
        report = _finish_report(cfg, out_dir, deployment, start, broker="memory", **run)
        if console is not None and cfg.console.linger_s > 0 and not interrupted:  # after the report: not its time
            logger.info("run over: the console stays up for %.0f s (console.linger_s)", cfg.console.linger_s)
            stop.wait(cfg.console.linger_s)
        return report
    finally:
        if console is not None:
            console.stop()
        runtime.close()


# ---------------------------------------------------------------------------------------------
# mqtt: real processes over a real broker


def _spawn(args: list[str], log_path: Path, echo: bool = False) -> subprocess.Popen:
    """Start a child process; its output goes to ``log_path`` (and to our stderr when ``echo``)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(log_path, "wb")
    if not echo:
        return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    def relay():
        for line in proc.stdout:  # type: ignore[union-attr]
            log.write(line)
            log.flush()
            sys.stderr.write(line.decode(errors="replace"))
        log.close()
    threading.Thread(target=relay, daemon=True).start()
    return proc


def _stop(proc: subprocess.Popen, grace: float) -> None:
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _kill(procs: list[subprocess.Popen], broker: EmbeddedMosquitto | None) -> None:
    """Stop at once (a second Ctrl-C): SIGKILL every child still running, by its PID."""
    for proc in procs + ([broker.process] if broker is not None and broker.process is not None else []):
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def run_over_mqtt(cfg: ExperimentConfig, out_dir: Path, broker_url: str | None = None,
                  log_level: str = "INFO", stop: threading.Event | None = None) -> dict | None:
    """Real processes over a real broker: one cloud-runtime, one edge-agent per device.

    ``stop`` (Ctrl-C): the runtime and the agents get SIGTERM (the runtime saves the rounds done and writes
    its report.json), then the broker this started is stopped, each by PID; the report of the rounds done is
    written and returned with ``run.interrupted`` (None when there is none yet). A KeyboardInterrupt (a
    second Ctrl-C) while waiting for them kills them all."""
    stop = stop or threading.Event()
    out_dir = _fresh_out_dir(cfg, out_dir)
    logs = out_dir / "logs"
    broker = None if broker_url else EmbeddedMosquitto(workdir=out_dir / "broker").start()
    url = broker_url or broker.url  # type: ignore[union-attr]
    procs: list[subprocess.Popen] = []
    start = time.perf_counter()
    interrupted = False
    try:
        deployment = write_deployment(cfg, out_dir, url)
        if stop.is_set():
            return None
        logger.info("deploying over %s: 1 cloud-runtime + %d edge-agent processes (logs in %s)", url,
                    len(deployment.agent_paths), logs)
        runtime = _spawn(runtime_command(cfg, deployment.runtime_path, log_level), logs / "runtime.log", echo=True)
        procs.append(runtime)
        for path in deployment.agent_paths:
            procs.append(_spawn([sys.executable, "-m", "edgefl_cli.agent", "--config", str(path),
                                 "--log-level", log_level], logs / f"{path.parent.name}.log"))
        deadline = time.monotonic() + cfg.deployment.timeout_s
        code = None
        while code is None and not stop.is_set():
            try:
                code = runtime.wait(0.2)
            except subprocess.TimeoutExpired:
                if time.monotonic() >= deadline:
                    raise RuntimeError(f"the run did not finish within {cfg.deployment.timeout_s:.0f}s "
                                       f"(see {logs})") from None
        # a Ctrl-C in a terminal reaches the runtime too (one process group): it may exit 130 before stop is set
        interrupted = stop.is_set() or code in (EXIT_INTERRUPTED, -signal.SIGINT)
        if interrupted:  # SIGTERM to each, by PID: the runtime saves the rounds done, writes report.json and exits;
            for proc in procs:  # the agents save their state and exit
                if proc.poll() is None:
                    proc.terminate()
            try:
                runtime.wait(STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                logger.warning("cloud-runtime did not stop within %.0fs: reporting its last saved round",
                               STOP_GRACE_S)
        elif code != 0:
            raise RuntimeError(f"cloud-runtime exited with {code} (see {logs / 'runtime.log'})")
        for proc in procs[1:]:
            _stop(proc, grace=10 if interrupted else 30)
    except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
        _kill(procs, broker)
        raise
    finally:
        try:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                _stop(proc, grace=10)
            if broker is not None:
                broker.stop()
        except KeyboardInterrupt:
            _kill(procs, broker)
            raise
    run = {"interrupted": True} if interrupted else {}
    lingered = cfg.console.linger_s if cfg.console.enabled and not interrupted else 0.0  # the runtime's, after its run
    return _finish_report(cfg, out_dir, deployment, start, lingered, broker=url if broker_url else "embedded",
                          agent_exit_codes=[p.returncode for p in procs[1:]], **run)


__all__ = ["Deployment", "run_in_memory", "run_over_mqtt", "write_deployment"]
