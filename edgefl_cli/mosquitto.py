"""Start and stop a private mosquitto broker on a free loopback port (simulations and tests)."""
from __future__ import annotations

import getpass
import logging
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

MOSQUITTO_CANDIDATES = ("mosquitto", "/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto")


def find_mosquitto() -> str:
    for candidate in MOSQUITTO_CANDIDATES:
        path = shutil.which(candidate) or (candidate if Path(candidate).is_file() else None)
        if path:
            return path
    raise FileNotFoundError("mosquitto not found: install it with 'apt-get install mosquitto' "
                            "(or pass --broker mqtt://host:port to use an existing broker)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmbeddedMosquitto:
    """``with EmbeddedMosquitto() as broker: broker.url`` -> ``mqtt://127.0.0.1:<port>``."""

    def __init__(self, port: int | None = None, workdir: str | Path | None = None, extra_config: str = "",
                 config_file: str | Path | None = None, persistent: bool = False):
        """``config_file``: run that mosquitto.conf as is (e.g. ``cloud-runtime provision``'s; ``port`` must
        be the port it listens on) instead of the generated loopback config."""
        if config_file is not None and port is None:
            raise ValueError("a given config_file needs its listener port")
        self.config_file = Path(config_file) if config_file is not None else None
        self.port = port or free_port()
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="edgefl-mosquitto-")
        self.workdir = Path(workdir or self._tmp.name)  # type: ignore[union-attr]
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.extra_config = extra_config
        self.persistent = persistent  # sessions, queued and retained messages survive a restart (as deployed)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    def config_text(self) -> str:
        # Queues sized for bursts of upload chunks from many devices: the broker must never
        # drop a QoS 1 message because one subscriber is momentarily slow.
        return "\n".join([
            f"listener {self.port} 127.0.0.1",
            f"user {getpass.getuser()}",  # started as root, mosquitto would drop to 'mosquitto' and lose its workdir
            "allow_anonymous true",
            *(["persistence true", f"persistence_location {self.workdir.resolve()}/"] if self.persistent
              else ["persistence false"]),
            "max_queued_messages 1000000",
            "max_inflight_messages 100",
            "message_size_limit 0",
            "set_tcp_nodelay true",  # small control frames and PUBACKs are not held back by Nagle's algorithm
            "log_type error",
            "log_type warning",
            "log_dest stderr",
            self.extra_config, ""])

    def start(self, timeout: float = 10.0) -> "EmbeddedMosquitto":
        conf = self.config_file
        if conf is None:
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(self.config_text())
        log = open(self.workdir / "mosquitto.log", "ab")
        self.process = subprocess.Popen([find_mosquitto(), "-c", str(conf)], stdout=log, stderr=log,
                                        stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: "
                                   f"{(self.workdir / 'mosquitto.log').read_text()[-2000:]}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    logger.info("mosquitto listening on %s", self.url)
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"mosquitto did not listen on port {self.port} within {timeout}s")

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> "EmbeddedMosquitto":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()
