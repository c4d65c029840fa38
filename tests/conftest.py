import os
from pathlib import Path

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def make_npz_dataset(directory: Path, n_train: int = 400, n_test: int = 200, size: int = 12, classes: int = 4,
                     seed: int = 0) -> Path:
    """An easy synthetic image set (class = position of a bright square): unit tests only."""
    rng = np.random.default_rng(seed)

    def make(n):
        labels = rng.integers(0, classes, n)
        images = rng.integers(0, 60, (n, size, size)).astype(np.uint8)
        half = size // 2
        for i, k in enumerate(labels):
            r, c = divmod(int(k), 2)
            images[i, r * half:(r + 1) * half, c * half:(c + 1) * half] += 150
        return images, labels

    directory.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = make(n)
        np.savez(directory / f"{split}.npz", images=images, labels=labels)
    return directory


@pytest.fixture
def npz_dir(tmp_path):
    return make_npz_dataset(tmp_path / "synthetic")


requires_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_DIR.exists(), reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)")


@pytest.fixture
def broker(tmp_path):
    from edgefl_cli.mosquitto import EmbeddedMosquitto, find_mosquitto
    try:
        find_mosquitto()
    except FileNotFoundError as e:
        pytest.fail(str(e))  # integration tests need the real broker: CI installs it
    with EmbeddedMosquitto(workdir=tmp_path / "broker") as b:
        yield b


def wait_until(condition, timeout=20.0, step=None):
    """Poll ``condition`` (calling ``step`` between polls) until true or fail after ``timeout`` s."""
    import time
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if step is not None:
            step()
        if condition():
            return
        time.sleep(0.02)
    raise AssertionError(f"condition not met within {timeout}s")


def wait_with_progress(proc, logs, *, stall_s: float = 300.0, limit_s: float = 3600.0) -> int:
    """Wait for ``proc`` to exit while it (or the processes writing ``logs``) makes progress: fail only when
    no log grew for ``stall_s`` seconds (a hang), not on a fixed budget sized for an idle machine; ``limit_s``
    bounds the whole wait. Returns the exit status."""
    import time
    sizes: dict = {}
    last_progress = start = time.monotonic()
    while True:
        try:
            return proc.wait(timeout=2)
        except Exception:  # subprocess.TimeoutExpired
            pass
        now = time.monotonic()
        current = {str(p): Path(p).stat().st_size for p in logs if Path(p).exists()}
        if current != sizes:
            sizes, last_progress = current, now
        if now - last_progress > stall_s:
            raise AssertionError(f"no progress for {stall_s:.0f}s (logs: {', '.join(map(str, logs))})")
        if now - start > limit_s:
            raise AssertionError(f"still running after {limit_s:.0f}s although making progress")
