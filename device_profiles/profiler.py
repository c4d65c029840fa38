"""What a model costs a device: FLOPs, memory, latency (measured here, estimated per profile), bytes.

* FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``: 2 FLOPs per multiply-accumulate of
  convolutions and matrix products (forward and the backward kernels autograd actually runs).
  Not counted: BatchNorm, ReLU, pooling, residual adds, the loss and the optimizer update (all
  O(activations), a few percent of a ResNet's work).
* Memory: parameters, gradients, optimizer state, and the activations autograd saves for backward
  (summed with ``saved_tensors_hooks``, unique storages), plus the measured peak RSS of a fresh
  process when asked.
* Latency: the median of repeated runs on this host, and per device an estimate
  ``FLOPs / (peak x efficiency) + traffic / (bandwidth x memory efficiency)``: the two sides of the
  roofline added (small-channel CNNs on CPUs overlap them poorly), with a relative band. Traffic
  is weights (and gradients/optimizer state) plus every layer's output written and read back.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
import weakref
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

from device_profiles import DeviceProfile
from model_zoo import create_model

METHODS = ("inference", "backprop")
# the efficiency (DeviceProfile.efficiency field) that estimates a step of each edge engine
ENGINE_RUNTIMES = {"torch": "torch_cpu", "onnxruntime": "onnxruntime_cpu"}
OPTIMIZER_STATE_FACTOR = {"sgd": 1, "adam": 2, "none": 0}  # state tensors per parameter


@dataclass
class ModelCost:
    model: str
    method: str
    batch: int
    input_shape: tuple
    params: int
    forward_flops: int
    backward_flops: int
    total_flops: int
    param_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    activation_bytes: int              # backprop: saved for backward; inference: peak alive at once (bytes)
    activation_traffic_bytes: int      # sum of every leaf module's output bytes in one forward
    feature_shape: tuple | None
    upload_bytes_per_sample: dict      # codec -> bytes (before zstd), FedGKT feature uploads
    fedavg_model_bytes: int            # fp32 weights, one direction, for comparison

    @property
    def train_flops_per_sample(self) -> float:
        return self.total_flops / self.batch

    def memory_bytes(self) -> int:
        return self.param_bytes + self.grad_bytes + self.optimizer_bytes + self.activation_bytes

    def moved_bytes(self) -> int:
        """Memory traffic of one step: weights (training: also gradients and optimizer state) plus each
        layer output written and read once forward; training adds about twice that backward."""
        if self.method == "inference":
            return self.param_bytes + 2 * self.activation_traffic_bytes
        return 3 * self.param_bytes + 2 * self.optimizer_bytes + 6 * self.activation_traffic_bytes


def _build(model_name: str, input_shape: tuple, num_classes: int, **kwargs) -> nn.Module:
    """The zoo model with its model options; raises ValueError naming an option the model does not take."""
    channels = {"feature_channels" if model_name.endswith("_server") else "in_channels": input_shape[0]}
    try:
        return create_model(model_name, num_classes=num_classes, **channels, **kwargs)
    except TypeError as e:  # an unknown or mistyped model option
        raise ValueError(f"{model_name} with options {kwargs}: {e}") from None


def _logits(out):
    return out[0] if isinstance(out, tuple) else out


def _run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str, optimizer=None) -> None:
    if method == "inference":
        model.eval()
        with torch.no_grad():
            model(x)
        return
    model.train()
    loss = nn.functional.cross_entropy(_logits(model(x)), y)
    loss.backward()
    if optimizer is not None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _activation_bytes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward (unique storages, parameters excluded)."""
    param_ptrs = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = nn.functional.cross_entropy(_logits(model(x)), y)
    del loss
    return sum(seen.values())


class _LiveBytes(TorchDispatchMode):
    """Bytes of the storages the ops under it create that are still alive, and their peak. A dispatch mode
    sees only its own thread's ops (torch's ``MemTracker`` hooks every module of the process, and another
    thread's forward under it failed: the in-memory simulation profiles devices while agents train)."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.live = self.peak = 0
        self._counted = set(exclude)  # data pointers: parameters, buffers and the input are counted apart

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key, size = storage.data_ptr(), storage.nbytes()
                if size and key not in self._counted:  # views and in-place results share a counted storage
                    self._counted.add(key)
                    self.live += size
                    self.peak = max(self.peak, self.live)
                    weakref.finalize(storage, self._freed, key, size)
        return out

    def _freed(self, key: int, size: int) -> None:
        self.live -= size
        self._counted.discard(key)


def _peak_live_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Peak bytes alive at once in one no-grad eval forward: the input batch plus the activations, parameters
    and buffers excluded (:class:`_LiveBytes`)."""
    exclude = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers(), x)}
    tracker = _LiveBytes(exclude)
    with torch.no_grad(), tracker:
        model.eval()(x)
    return tracker.peak + x.untyped_storage().nbytes()


def _traffic_bytes(model: nn.Module, x: torch.Tensor) -> int:
    """Bytes of all leaf-module outputs in one forward pass (convolutions, norms, activations, ...)."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        for t in output if isinstance(output, tuple) else (output,):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()

    handles = [m.register_forward_hook(hook) for m in model.modules() if not list(m.children())]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for h in handles:
            h.remove()
    return total


def model_cost(model_name: str, method: str = "backprop", batch: int = 64, input_shape: tuple = (3, 32, 32),
               num_classes: int = 10, optimizer: str = "sgd", **model_kwargs) -> ModelCost:
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    model = _build(model_name, input_shape, num_classes, **model_kwargs)
    x = torch.randn(batch, *input_shape)
    y = torch.randint(0, num_classes, (batch,))
    with FlopCounterMode(display=False) as counter:
        model.eval() if method == "inference" else model.train()
        with torch.set_grad_enabled(method != "inference"):
            out = model(x)
    forward = counter.get_total_flops()
    backward = 0
    if method != "inference":
        loss = nn.functional.cross_entropy(_logits(out), y)
        with FlopCounterMode(display=False) as counter:
            loss.backward()
        backward = counter.get_total_flops()
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    training = method != "inference"
    feature_shape = None
    if hasattr(model, "forward_features") and not model_name.endswith("_server"):
        with torch.no_grad():
            feature_shape = tuple(model.forward_features(x[:1]).shape[1:])
    upload = {}
    if feature_shape is not None:
        n = int(torch.tensor(feature_shape).prod())
        overhead = 8 + 8 + num_classes * 2  # id, label, fp16 logits
        upload = {"fp32": n * 4 + 8 + 8 + num_classes * 4, "fp16": n * 2 + overhead, "int8": n + overhead}
    return ModelCost(
        model=model_name, method=method, batch=batch, input_shape=tuple(input_shape), params=params,
        forward_flops=forward, backward_flops=backward, total_flops=forward + backward, param_bytes=params * 4,
        grad_bytes=trainable * 4 if training else 0,
        optimizer_bytes=trainable * 4 * OPTIMIZER_STATE_FACTOR[optimizer] if training else 0,
        activation_bytes=_activation_bytes(model, x, y) if training else _peak_live_bytes(model, x),
        activation_traffic_bytes=_traffic_bytes(model, x), feature_shape=feature_shape,
        upload_bytes_per_sample=upload, fedavg_model_bytes=params * 4)


def measure_latency(model_name: str, method: str = "backprop", batch: int = 64, input_shape: tuple = (3, 32, 32),
                    num_classes: int = 10, repeats: int = 15, warmup: int = 5, **model_kwargs) -> dict:
    """Median wall time of one step (training: forward, backward, SGD update) on this host."""
    model = _build(model_name, input_shape, num_classes, **model_kwargs).to(memory_format=torch.channels_last)
    x = torch.randn(batch, *input_shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, num_classes, (batch,))
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9) if method != "inference" else None
    for _ in range(warmup):
        _run(model, x, y, method, optimizer)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _run(model, x, y, method, optimizer)
        times.append(time.perf_counter() - start)
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times), "repeats": repeats,
            "threads": torch.get_num_threads()}


# The peak RSS (KB) of this process image, for code run in a fresh process: /proc's VmHWM. Not getrusage's
# ru_maxrss: Linux carries it across fork and execve, so a child would report its parent's peak when larger.
PEAK_RSS_KB_CODE = """
def peak_rss_kb():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
"""


def measure_peak_rss(model_name: str, method: str, batch: int, input_shape: tuple, num_classes: int = 10,
                     **model_kwargs) -> dict:
    """Peak RSS (MB) of a fresh process running three steps, and its baseline after importing torch and
    building the model (the step's own peak is the difference)."""
    code = (
        "import json, sys, torch\n" + PEAK_RSS_KB_CODE +
        "from device_profiles.profiler import _build, _run\n"
        f"m = _build({model_name!r}, {tuple(input_shape)!r}, {num_classes}, **{model_kwargs!r})\n"
        "base = peak_rss_kb()\n"
        f"x = torch.randn({batch}, *{tuple(input_shape)!r}); y = torch.randint(0, {num_classes}, ({batch},))\n"
        f"opt = torch.optim.SGD(m.parameters(), lr=1e-3, momentum=0.9) if {method!r} != 'inference' else None\n"
        f"[_run(m, x, y, {method!r}, opt) for _ in range(3)]\n"
        "peak = peak_rss_kb()\n"
        "print(json.dumps({'peak_rss_mb': peak / 1024, 'baseline_rss_mb': base / 1024, 'step_rss_mb': (peak - base) / 1024}))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_peak_gflops(threads: int | None = None, n: int = 2048, repeats: int = 5,
                        clock=time.perf_counter) -> float:
    """This host's fp32 peak in GFLOP/s: the best of ``repeats`` ``n x n`` sgemms (2 n^3 FLOPs each) on
    ``threads`` torch threads (None: the current setting). What a roofline's compute roof is measured as,
    instead of assumed from the CPU's vector flags (which cannot tell one FMA port from two). ``clock``:
    ``time.process_time`` gives GFLOP per CPU-second (what per-CPU-second step rates compare with)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        torch.mm(a, b)  # warm-up: allocation and the BLAS kernel's dispatch
        best = float("inf")
        for _ in range(repeats):
            start = clock()
            torch.mm(a, b)
            best = min(best, clock() - start)
    finally:
        torch.set_num_threads(previous)
    return 2 * n ** 3 / best / 1e9


def estimate_latency(cost: ModelCost, profile: DeviceProfile, runtime: str = "torch_cpu") -> dict:
    """Roofline bound divided by the profile's efficiency, with the profile's uncertainty band."""
    efficiency = getattr(profile.efficiency, runtime)
    if efficiency is None:
        raise ValueError(f"profile {profile.name} has no efficiency for runtime {runtime!r}")
    peak = profile.gpu.peak_gflops if runtime.endswith("gpu") and profile.gpu else profile.cpu.peak_gflops
    compute_s = cost.total_flops / (peak * 1e9 * efficiency)
    memory_s = cost.moved_bytes() / (profile.memory.bandwidth_gbs * 1e9 * profile.efficiency.memory)
    estimate = compute_s + memory_s
    band = 1.0 + profile.uncertainty
    return {"device": profile.name, "runtime": runtime, "estimate_s": estimate, "low_s": estimate / band,
            "high_s": estimate * band, "compute_s": compute_s, "memory_s": memory_s,
            "bound": "compute" if compute_s >= memory_s else "memory",
            "calibrated": profile.calibrated, "fits_in_ram": cost.memory_bytes() < profile.memory.ram_gb * 2 ** 30}


def cost_row(cost: ModelCost) -> dict:
    row = asdict(cost)
    row.update(train_flops=cost.total_flops, train_flops_per_sample=cost.train_flops_per_sample,
               memory_bytes=cost.memory_bytes())
    return row

