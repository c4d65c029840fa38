"""FedGKT's server training over ``torch.distributed``: DistributedDataParallel across ranks that ``torchrun``
starts (Gloo on CPUs, NCCL on GPUs), with the same global batch and the same BatchNorm statistics as one
process.

    torchrun --standalone --nproc-per-node 2 -m edgefl_cli.runtime serve --config runtime.yaml

Rank 0 is the coordinator: the whole runtime (broker session, registry, ingest, the feature store, rounds,
evaluation, checkpoints). Ranks 1..N-1 are training ranks (:func:`serve_rank`): they hold no state between
rounds and wait for the coordinator's commands. For each round of server training the coordinator

1. posts a ``train`` command carrying the model's and optimizer's state (so a restarted rank needs nothing
   else: torchrun's elastic restart is the replacement);
2. draws the epoch's order with its own RNG (the single-process order), cuts every global batch of
   ``server.batch_size`` into one contiguous part per rank (:func:`split_batches`), and scatters each rank
   *its shard*: the compact rows of its parts (uint8 with each row's int8 scale and offset, or float), the
   teacher logits and labels (:meth:`~cloud_runtime.features.FeatureStore.gather`);
3. trains its own shard in lockstep with the others (:func:`train_shard`), and gathers every rank's
   last-epoch logits (the soft labels, by global row) and loss sums.

Each rank's loss is its rows' mean scaled by ``b_r * N / B`` (its part's share of the global batch), so DDP's
average of gradients is the gradient of the global batch's mean loss even when the parts differ by a row.

**BatchNorm rule: global-batch statistics.** Every BatchNorm layer normalizes with the mean and variance of
the whole global batch across ranks (one all-reduce of per-channel sums per layer, differentiable (its backward all-reduces the gradients):
:class:`GlobalBatchNorm2d` on CPUs, ``torch.nn.SyncBatchNorm`` on GPUs, which does the same and has no CPU
kernels), so N ranks compute what one process computes, up to floating-point summation order. Running
statistics are then identical on every rank. Evaluation and ``eval_pass`` soft labels run on the
coordinator (eval-mode BatchNorm uses the running statistics: no collective).

A coordinator that stops mid-round tells the ranks at the next step (one 1-element all-reduce per step), so
no rank is left waiting in a collective. Between rounds the ranks wait on the rendezvous store's key for the
next command, not in a collective, so waiting for devices for hours never trips a collective timeout. Each
elastic restart uses keys of its own in that store (:func:`attempt_store`).
"""
from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from cloud_runtime.progress import ProgressLog
from model_zoo.losses import gkt_loss

logger = logging.getLogger("edgefl.runtime")

COMMAND_KEY = "edgefl/command"


@dataclass(frozen=True)
class Launch:
    """Where this process sits in a ``torchrun`` launch (its environment variables)."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    restart: int            # TORCHELASTIC_RESTART_COUNT: 0 on the first attempt

    @property
    def coordinator(self) -> bool:
        return self.rank == 0


def launched(environ=os.environ) -> Launch | None:
    """This process's place in a torchrun launch of more than one rank; None for a plain process (or 1 rank).
    Raises ValueError when the variables are malformed."""
    world = environ.get("WORLD_SIZE")
    if world is None or int(world) <= 1:
        return None
    try:
        rank, local_rank = int(environ["RANK"]), int(environ.get("LOCAL_RANK", environ["RANK"]))
        local_world = int(environ.get("LOCAL_WORLD_SIZE", world))
    except (KeyError, ValueError) as e:
        raise ValueError(f"torchrun environment incomplete or malformed: {e}") from None
    if not 0 <= rank < int(world):
        raise ValueError(f"RANK {rank} outside WORLD_SIZE {world}")
    return Launch(rank, int(world), local_rank, local_world, int(environ.get("TORCHELASTIC_RESTART_COUNT", "0")))


def server_device(cfg, local_rank: int | None = None) -> torch.device:
    """Where the server model trains (``cfg``: the ServerConfig): ``server.device`` (auto: CUDA when
    available), on GPU ``local_rank`` when torchrun started this process. Raises RuntimeError when cuda is
    asked for and there is none."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("server.device is cuda but no CUDA device is available")
    if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available()):
        return torch.device("cuda", local_rank) if local_rank is not None else torch.device("cuda")
    return torch.device("cpu")


# -- the global-batch BatchNorm --------------------------------------------------------------------------


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are the global batch's across the default process group.

    Per channel, each rank contributes ``sum x``, ``sum x^2`` and its count over N, H, W; one differentiable
    all-reduce (``torch.distributed._functional_collectives.all_reduce``, whose backward all-reduces the
    gradients) gives
    the global mean and biased variance (float32 sums shifted by the running mean), as ``nn.BatchNorm2d``
    computes them over one batch (Ioffe & Szegedy 2015, Alg. 1). Running statistics take the unbiased
    variance. Eval mode, a single process, or a forward outside a lockstep round (:func:`train_shard`) is
    plain BatchNorm2d. Input ``B x C x H x W``, any float dtype
    (returned in it)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or not _Lockstep.active or dist.get_world_size() == 1:
            return super().forward(x)
        from torch.distributed import _functional_collectives as funcol
        xf = x.float()
        c = xf.shape[1]
        shape = (1, c, 1, 1)
        # sums of x - shift, shift the running mean (equal on every rank): E[d^2] - E[d]^2 keeps its precision
        # when |mean| >> std, where the unshifted E[x^2] - E[x]^2 would cancel
        shift = self.running_mean.detach().clone() if self.track_running_stats else xf.new_zeros(c)
        d = xf - shift.view(shape)
        count = xf.new_tensor([xf.numel() / c])
        local = torch.cat([d.sum((0, 2, 3)), (d * d).sum((0, 2, 3)), count])
        stats = funcol.wait_tensor(funcol.all_reduce(local, "sum", dist.group.WORLD))
        n = stats[-1]
        mean_d = stats[:c] / n
        var = (stats[c:2 * c] / n - mean_d * mean_d).clamp_min(0)
        mean = shift + mean_d
        if self.track_running_stats:
            with torch.no_grad():
                m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
                self.running_mean.mul_(1 - m).add_(mean.detach(), alpha=m)
                self.running_var.mul_(1 - m).add_(var.detach() * (n / (n - 1).clamp_min(1)), alpha=m)
                self.num_batches_tracked.add_(1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_batchnorm(module: nn.Module, device_type: str) -> nn.Module:
    """``module`` with its BatchNorm2d layers computing global-batch statistics (in place; the parameters and
    buffers are the same tensors, so state dicts keep their keys): SyncBatchNorm on CUDA, GlobalBatchNorm2d
    elsewhere."""
    if device_type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d:
            replacement = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                            child.track_running_stats)
            replacement.weight, replacement.bias = child.weight, child.bias
            for buffer in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(replacement, buffer, getattr(child, buffer))
            replacement.train(child.training)
            setattr(module, name, replacement)
        else:
            convert_batchnorm(child, device_type)
    return module


# -- the shard plan ------------------------------------------------------------------------------------


def split_batches(batches: list[np.ndarray], world: int) -> list[list[np.ndarray]]:
    """Each global batch cut into ``world`` contiguous parts (sizes differ by at most one row); returns, per
    rank, its part of every batch in order. Raises ValueError when a batch has fewer rows than ranks."""
    parts: list[list[np.ndarray]] = [[] for _ in range(world)]
    for batch in batches:
        if len(batch) < world:
            raise ValueError(f"a global batch of {len(batch)} rows cannot give each of {world} ranks a row")
        for r, part in enumerate(np.array_split(batch, world)):
            parts[r].append(part)
    return parts


@dataclass
class RankShard:
    """What one rank trains in one epoch: its rows of every global batch, in step order.

    ``data``: ``n x C x H x W`` uint8 with per-row ``scale`` and ``low`` (``n x C`` float32; the row's device's
    int8 codec parameters) or float32 with none; ``teacher`` ``n x K`` float32; ``labels`` ``n`` int64;
    ``positions`` ``n`` int64 (rows of the coordinator's global order: where soft labels go); ``bounds``: the
    rank's rows of step ``k`` are ``bounds[k]:bounds[k+1]``; ``global_sizes[k]``: step k's global batch size."""

    data: np.ndarray
    scale: np.ndarray | None
    low: np.ndarray | None
    teacher: np.ndarray
    labels: np.ndarray
    positions: np.ndarray
    bounds: np.ndarray
    global_sizes: np.ndarray

    def features(self, lo: int, hi: int) -> np.ndarray:
        """float32 ``b x C x H x W`` of rows ``lo:hi``, dequantized as :meth:`CompactFeatures.rows` does."""
        block = self.data[lo:hi]
        out = block.astype(np.float32)
        if self.scale is not None:
            out *= self.scale[lo:hi, :, None, None]
            out += self.low[lo:hi, :, None, None]
        return out


def plan_shards(store, flat: list[np.ndarray], world: int) -> list[RankShard]:
    """Every rank's shard for one epoch: the epoch's global batches (rows of the store's global order, cut by
    :func:`cloud_runtime.server_trainer.batches` with ``min_last=world``) cut into per-rank parts. Together the
    shards hold one compact copy of the store's rows (one epoch at a time, so never more)."""
    devices, offsets = store.layout()
    shards = []
    for parts in split_batches(flat, world):
        index = np.concatenate(parts)
        data, scale, low, teacher, labels = store.gather(index, devices, offsets)
        bounds = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        shards.append(RankShard(data, scale, low, teacher, labels, index.astype(np.int64), bounds,
                                np.array([len(b) for b in flat], np.int64)))
    return shards


# -- one rank's epoch ----------------------------------------------------------------------------------


@dataclass
class ShardResult:
    """One rank's epoch: its sums of (loss, CE, KD, correct) and sample count; with ``keep_logits``, its logits
    (``n x K`` float32) by global row ``positions``. ``stopped``: the coordinator stopped the round."""

    positions: np.ndarray
    logits: np.ndarray
    totals: np.ndarray
    samples: int
    stopped: bool = False


class _LockstepFlag(threading.local):
    """Whether this thread's training forward passes run in lockstep with the other ranks (GlobalBatchNorm2d
    reduces only then: a round too small for the ranks trains on the coordinator alone, and no other thread
    of the coordinator, an overlapped evaluation, ever joins a collective)."""
    active = False


_Lockstep = _LockstepFlag()


def train_shard(model: nn.Module, optimizer, shard: RankShard, cfg, device: torch.device, autocast: bool,
                num_classes: int, keep_logits: bool, stop=None, meter_label: str = "",
                progress=None) -> ShardResult:
    """Train ``model`` (DDP-wrapped) for one epoch on this rank's shard, in lockstep with the other ranks.
    ``cfg``: the ServerConfig. ``stop`` (an Event, the coordinator's): checked before every step and shared with
    the ranks by a 1-element all-reduce, so every rank leaves the round at the same step."""
    world = dist.get_world_size()
    logits = np.zeros((len(shard.positions), num_classes if keep_logits else 0), np.float32)
    totals, seen = np.zeros(4), 0
    use_kd = cfg.kd_beta > 0
    flag = torch.zeros(1, device=device)
    meter = ProgressLog(logger, meter_label, int(shard.global_sizes.sum())) if dist.get_rank() == 0 else None
    model.train()
    _Lockstep.active = True
    try:
        for k in range(len(shard.global_sizes)):
            flag.fill_(1.0 if stop is not None and stop.is_set() else 0.0)
            dist.all_reduce(flag)
            if float(flag) > 0:
                return ShardResult(shard.positions, logits, totals, seen, stopped=True)
            lo, hi = int(shard.bounds[k]), int(shard.bounds[k + 1])
            x = torch.from_numpy(shard.features(lo, hi)).to(device).contiguous(memory_format=torch.channels_last)
            labels = torch.from_numpy(shard.labels[lo:hi]).to(device)
            teacher = torch.from_numpy(shard.teacher[lo:hi]).to(device) if use_kd else None
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                out = model(x).float()
            loss, ce, kd = gkt_loss(out, labels, teacher, None, cfg.kd_beta, cfg.temperature)
            b, global_b = hi - lo, int(shard.global_sizes[k])
            optimizer.zero_grad(set_to_none=True)
            (loss * (b * world / global_b)).backward()   # DDP averages over ranks: the global batch's mean
            optimizer.step()
            if keep_logits:
                logits[lo:hi] = out.detach().float().cpu().numpy()
            totals += (float(loss.detach()) * b, float(ce) * b, float(kd) * b, int((out.argmax(1) == labels).sum()))
            seen += b
            if meter is not None:  # rank 0 speaks for the group
                meter.update(global_b)
            if progress is not None:
                progress(global_b)
    finally:
        _Lockstep.active = False
    if meter is not None:
        meter.finish()
    return ShardResult(shard.positions, logits, totals, seen)


# -- the group -----------------------------------------------------------------------------------------


class TrainingGroup:
    """The default process group of a torchrun launch, and the coordinator's command channel to the ranks.

    ``backend``: ``auto`` (NCCL when the server trains on CUDA, else Gloo), ``gloo`` or ``nccl``;
    ``timeout_s``: the collectives' timeout (a rank that never answers within it fails the round)."""

    def __init__(self, launch: Launch, backend: str = "auto", timeout_s: float = 1800.0, cuda: bool = False):
        self.launch = launch
        if backend == "auto":
            backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(launch.local_rank)
        self.backend = backend
        self.store = attempt_store(launch)
        dist.init_process_group(backend, store=self.store, rank=launch.rank, world_size=launch.world_size,
                                timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.commands = 0
        self.ddp: nn.Module | None = None
        self.broken: str | None = None     # why the ranks can no longer be reached in step (then: no more posts)
        self.terminating = False            # rank > 0: SIGTERM / SIGINT arrived (it leaves between rounds)
        logger.info("server training group: rank %d of %d (%s, restart %d)", self.rank, self.world, backend,
                    launch.restart)

    def _key(self, n: int) -> str:
        return f"{COMMAND_KEY}/{n}"

    def post(self, command: dict) -> None:
        """Coordinator: send ``command`` to every rank (posts a key, then broadcasts the payload)."""
        if self.broken:
            raise RuntimeError(f"the training ranks are out of step ({self.broken}): restart the group")
        self.commands += 1
        self.store.set(self._key(self.commands), b"1")
        dist.broadcast_object_list([command], src=0)

    def next_command(self, poll_s: float = 0.5) -> dict | None:
        """Rank > 0: wait (as long as it takes) for the coordinator's next command; None when this rank was
        asked to terminate meanwhile. Polls the store (``check``: no timeouts, no log lines while waiting);
        raises when the store is gone (torchrun's agent ended)."""
        self.commands += 1
        key = self._key(self.commands)
        while not self.store.check([key]):
            if self.terminating:
                return None
            time.sleep(poll_s)
        box = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def wrap(self, model: nn.Module, device: torch.device) -> nn.Module:
        """The DDP wrapper of ``model`` (made once, on every rank at the same command: it is a collective)."""
        if self.ddp is None:
            convert_batchnorm(model, device.type)
            self.ddp = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None,
                forward_sync_buffers=False)  # BatchNorm's running statistics are global already: equal everywhere
        return self.ddp

    def scatter(self, shards: list[RankShard] | None) -> RankShard:
        box = [None]
        dist.scatter_object_list(box, shards, src=0)
        return box[0]

    def gather(self, result: ShardResult) -> list[ShardResult] | None:
        out = [None] * self.world if self.rank == 0 else None
        dist.gather_object(result, out, dst=0)
        return out

    def close(self) -> None:
        """Coordinator: tell the ranks the run is over (not when they are out of step: they would wait in a
        collective until ``dist_timeout_s``; leaving the group drops their connections and they fail at once);
        every rank: leave the group."""
        if not dist.is_initialized():
            return
        if self.rank == 0 and not self.broken:
            try:
                self.post({"op": "stop"})
            except Exception as e:  # ranks gone already (a stop reached them too, or they died): nothing to tell
                logger.info("the training ranks had left already: %s", str(e).splitlines()[0][:200])
        dist.destroy_process_group()


def attempt_store(launch: Launch, environ=os.environ) -> dist.Store:
    """The rendezvous store of this launch attempt: torchrun's TCPStore (``MASTER_ADDR``/``MASTER_PORT``; hosted
    by torchrun's agent, or by rank 0 when the ranks were started some other way) under a prefix of its own
    per elastic restart. torchrun keeps one store across restarts, and a restarted group that read the last
    attempt's keys (a dead rank's address) would fail to connect."""
    host, port = environ.get("MASTER_ADDR", "127.0.0.1"), int(environ.get("MASTER_PORT", "29500"))
    agent_hosted = environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(host, port, launch.world_size, is_master=not agent_hosted and launch.rank == 0,
                          timeout=timedelta(seconds=300), wait_for_workers=False)
    return dist.PrefixStore(f"edgefl/attempt_{launch.restart}", store)


def serve_rank(launch: Launch, cfg) -> int:
    """A training rank (rank > 0) of ``cfg`` (the RuntimeConfig): wait for the coordinator's commands, train
    each round's shards, until the coordinator says stop. Holds no state between rounds. SIGTERM and SIGINT
    (torchrun passes an operator's stop to every rank) end it between rounds; within a round it trains on
    until the coordinator, which stops too, shares its stop at the next step."""
    import signal
    from model_zoo import create_model
    from model_zoo.optim import make_optimizer
    device = server_device(cfg.server, launch.local_rank)
    group = TrainingGroup(launch, cfg.server.dist_backend, cfg.server.dist_timeout_s, device.type == "cuda")

    def terminate(*_):
        group.terminating = True
    signal.signal(signal.SIGTERM, terminate)
    signal.signal(signal.SIGINT, terminate)
    model = optimizer = None
    try:
        while True:
            command = group.next_command()
            if command is None or command["op"] == "stop":
                logger.info("rank %d: %s", group.rank, "terminated" if command is None else
                            "the coordinator ended the run")
                return 0
            if model is None:
                spec = command["model"]
                model = create_model(spec["name"], num_classes=spec["num_classes"],
                                     feature_channels=spec["feature_channels"], **spec["kwargs"])
                model = model.to(device, memory_format=torch.channels_last)
                optimizer = make_optimizer(model.parameters(), cfg.server, fused=True)
            model.load_state_dict(command["state"]["model"])
            optimizer.load_state_dict(command["state"]["optimizer"])
            ddp = group.wrap(model, device)
            start, samples, stopped = time.perf_counter(), 0, False
            for epoch in range(command["epochs"]):
                shard = group.scatter(None)
                last = epoch == command["epochs"] - 1
                result = train_shard(ddp, optimizer, shard, cfg.server, device, cfg.server.precision == "bf16",
                                     command["model"]["num_classes"], keep_logits=last)
                group.gather(result)
                samples += result.samples
                if result.stopped:
                    stopped = True
                    break
            logger.info("rank %d: round %d, %d samples in %.1f s%s", group.rank, command["round"], samples,
                        time.perf_counter() - start, " (stopped)" if stopped else "")
    finally:
        group.close()


def state_for_ranks(model: nn.Module, optimizer) -> dict:
    """The model and optimizer state the coordinator sends with a command (CPU tensors: picklable anywhere)."""
    def cpu(x):
        if isinstance(x, torch.Tensor):
            return x.detach().cpu().clone()
        if isinstance(x, dict):
            return {k: cpu(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return type(x)(cpu(v) for v in x)
        return x
    return {"model": cpu(model.state_dict()), "optimizer": cpu(optimizer.state_dict())}
