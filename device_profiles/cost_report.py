"""Per-device cost lines for the cloud runtime's report: predicted vs measured, FLOPs, bytes."""
from __future__ import annotations

from device_profiles import load_profile
from device_profiles.profiler import ENGINE_RUNTIMES, estimate_latency, model_cost


def device_cost(info: dict, rounds_done: int, cache: dict) -> dict | None:
    """``info`` is the runtime's registry entry (registration + heartbeats + byte counters). The prediction
    uses the efficiency of the device's engine (``info["engine"]``: torch, or onnxruntime with the profile's
    ``efficiency.onnxruntime_cpu``; a profile without it falls back to ``torch_cpu``, as ``predicted_runtime``
    says)."""
    model, batch, shape = info.get("model"), info.get("batch_size"), info.get("input_shape")
    if not model or not batch or not shape:
        return None
    kwargs = info.get("model_kwargs") or {}
    optimizer = info.get("optimizer") if info.get("optimizer") in ("sgd", "adam") else "sgd"
    key = (model, batch, tuple(shape), tuple(sorted(kwargs.items())), optimizer)
    if key not in cache:
        cache[key] = (model_cost(model, "backprop", batch, tuple(shape), optimizer=optimizer, **kwargs),
                      model_cost(model, "inference", batch, tuple(shape), **kwargs))
    train, infer = cache[key]
    profile = load_profile(info.get("profile") or "host")
    engine = info.get("engine") if info.get("engine") in ENGINE_RUNTIMES else "torch"
    runtime = ENGINE_RUNTIMES[engine]
    if getattr(profile.efficiency, runtime) is None:
        runtime = ENGINE_RUNTIMES["torch"]
    predicted = estimate_latency(train, profile, runtime)
    measured = (info.get("heartbeat") or {}).get("step_time_s")
    train_samples, test_samples = info.get("train_samples") or 0, info.get("test_samples") or 0
    epochs = info.get("epochs") or 1
    flops = rounds_done * (train_samples * epochs * train.train_flops_per_sample
                           + (train_samples + test_samples) * infer.total_flops / infer.batch)
    return {"profile": profile.name, "engine": engine, "predicted_runtime": runtime, "predicted_step_s": predicted["estimate_s"],
            "predicted_band_s": [predicted["low_s"], predicted["high_s"]], "measured_step_s": measured,
            "prediction_error": (predicted["estimate_s"] / measured - 1) if measured else None,
            "train_flops_per_sample": train.train_flops_per_sample, "flops_spent": flops,
            "train_memory_bytes": train.memory_bytes(), "peak_rss_mb": (info.get("heartbeat") or {}).get("rss_mb"),
            "bytes_up": info.get("bytes_up"), "bytes_down": info.get("bytes_down"), "rounds": rounds_done}
