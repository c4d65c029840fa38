"""Device profiles: what an edge device (or the cloud host) can compute and move, with sources.

Each ``device_profiles/<name>.yaml`` is validated strictly into :class:`DeviceProfile` (unknown
keys, missing fields and impossible values name the offending key). ``detect_host()`` builds a
profile of the machine it runs on from /proc; ``device-profile --measure`` calibrates it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from edgefl_core.config import ConfigError, build_dataclass, read_yaml, require
from edgefl_core.proc import usable_cores

PROFILE_DIR = Path(__file__).resolve().parent


@dataclass
class CpuSpec:
    cores: int
    clock_ghz: float
    peak_gflops: float          # FP32, all cores

    def check(self) -> None:
        require(self.cores >= 1, "cores", f"must be >= 1, got {self.cores}")
        require(self.clock_ghz > 0, "clock_ghz", f"must be > 0, got {self.clock_ghz}")
        require(self.peak_gflops > 0, "peak_gflops", f"must be > 0, got {self.peak_gflops}")


@dataclass
class GpuSpec:
    name: str
    peak_gflops: float

    def check(self) -> None:
        require(self.peak_gflops > 0, "peak_gflops", f"must be > 0, got {self.peak_gflops}")


@dataclass
class MemorySpec:
    ram_gb: float
    bandwidth_gbs: float        # sustained (STREAM-like) bandwidth used by the roofline bound

    def check(self) -> None:
        require(self.ram_gb > 0, "ram_gb", f"must be > 0, got {self.ram_gb}")
        require(self.bandwidth_gbs > 0, "bandwidth_gbs", f"must be > 0, got {self.bandwidth_gbs}")


@dataclass
class Efficiency:
    """Fraction of peak FLOP/s each runtime class reaches on this device's kind of convolution."""

    torch_cpu: float
    onnxruntime_cpu: float | None = None
    torch_gpu: float | None = None
    # Fraction of memory.bandwidth_gbs that activation traffic sees; above 1 when caches serve part of it.
    memory: float = 0.5

    def check(self) -> None:
        for name in ("torch_cpu", "onnxruntime_cpu", "torch_gpu"):
            value = getattr(self, name)
            require(value is None or 0 < value <= 1, name, f"must be in (0, 1], got {value}")
        require(0 < self.memory <= 8, "memory", f"must be in (0, 8], got {self.memory}")


@dataclass
class DeviceProfile:
    name: str
    display_name: str
    cpu: CpuSpec
    memory: MemorySpec
    power_w: float
    efficiency: Efficiency
    sources: dict
    gpu: GpuSpec | None = None
    calibrated: bool = False     # efficiency measured on the device (device-profile --measure)
    uncertainty: float = 1.0     # relative band of estimates: 1.0 = within 2x either way

    def check(self) -> None:
        require(bool(re.fullmatch(r"[a-z0-9_]+", self.name)), "name", "must be lower_snake_case")
        require(self.power_w > 0, "power_w", f"must be > 0, got {self.power_w}")
        require(self.uncertainty > 0, "uncertainty", "must be > 0")
        for key in ("cpu", "peak_gflops", "bandwidth_gbs", "efficiency"):
            require(key in self.sources, "sources", f"missing the source of {key!r}")


def load_profile(name_or_path: str | Path) -> DeviceProfile:
    """A profile by name (``raspberry_pi_4``), by path, or ``host`` for this machine."""
    if str(name_or_path) == "host":
        return detect_host()
    path = Path(name_or_path)
    if not path.suffix:
        path = PROFILE_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise ConfigError(f"unknown device profile {str(name_or_path)!r}; known: {', '.join(list_profiles())}")
    try:
        return build_dataclass(DeviceProfile, read_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def list_profiles() -> list[str]:
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml")) + ["host"]


def _cpu_flops_per_cycle(flags: set[str]) -> int:
    # FP32 FLOP/cycle/core with two FMA ports: AVX-512 16 lanes, AVX2 8 lanes, SSE 4 lanes; x2 for FMA.
    if "avx512f" in flags:
        return 64
    if "avx2" in flags and "fma" in flags:
        return 32
    if "avx" in flags:
        return 16
    return 8


def detect_host() -> DeviceProfile:
    """An uncalibrated profile of this machine (peak from CPU flags x cores x clock)."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(re.search(r"^flags\s*:\s*(.*)$", cpuinfo, re.M).group(1).split()) if "flags" in cpuinfo else set()
    mhz = re.findall(r"^cpu MHz\s*:\s*([\d.]+)", cpuinfo, re.M)
    clock = float(mhz[0]) / 1000 if mhz else 2.0
    model = re.search(r"^model name\s*:\s*(.*)$", cpuinfo, re.M)
    cores = usable_cores()
    meminfo = Path("/proc/meminfo").read_text() if Path("/proc/meminfo").exists() else ""
    total_kb = re.search(r"MemTotal:\s*(\d+)", meminfo)
    per_cycle = _cpu_flops_per_cycle(flags)
    return DeviceProfile(
        name="host", display_name=f"this machine ({model.group(1).strip() if model else 'unknown CPU'}, {cores} cores)",
        cpu=CpuSpec(cores, clock, cores * clock * per_cycle),
        memory=MemorySpec(int(total_kb.group(1)) / 1024 ** 2 if total_kb else 1.0, 10.0),
        power_w=15.0 * cores, efficiency=Efficiency(torch_cpu=0.15, onnxruntime_cpu=0.2),
        sources={"cpu": "/proc/cpuinfo", "peak_gflops": f"derived: {cores} cores x {clock:.2f} GHz x {per_cycle} "
                                                        f"FP32 FLOP/cycle from the CPU flags",
                 "bandwidth_gbs": "placeholder until device-profile --measure", "efficiency": "prior (uncalibrated)"})
