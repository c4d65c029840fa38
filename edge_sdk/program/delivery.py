"""A device's side of edge-program delivery: which programs the runtime announced, which one arrived, which
were refused, and when to ask again. Torch-free; builds no engine (the agent does, from :meth:`candidates`).

Trust: only digests the runtime announced in a recipe frame (which only the runtime may publish: broker
ACLs) are ever run, and a received blob is judged against them by its SHA-256 (docs/SECURITY.md, threat 17).
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Callable, Iterator, TypeVar

from edge_sdk.program.cache import ProgramCache, is_digest
from edge_sdk.program.format import MAX_PROGRAM_BYTES, EdgeProgram, ProgramError, program_digest, unpack_program

logger = logging.getLogger("edgefl.agent")

MAX_ANNOUNCED_PROGRAMS = 256  # one per distinct edge recipe of a run (edge_overrides)
PROGRAM_REQUEST_S = (150.0, 1200.0)  # no engine yet: ask again (register) after this, doubling up to the cap
Engine = TypeVar("Engine")


class ProgramInbox:
    """Announced digests (oldest first, at most :data:`MAX_ANNOUNCED_PROGRAMS`), the last received blob not
    judged yet, the digests refused in this run, and the on-disk :class:`ProgramCache` under ``cache_dir``."""

    def __init__(self, cache_dir: str | Path, device: str = ""):
        self.cache, self.device = ProgramCache(cache_dir), device  # (device: for the logs)
        self.announced: list[str] = []
        self.received: tuple[str, bytes] | None = None  # (digest, blob): hashed once, on arrival
        self.refused: set[str] = set()
        self.current: str | None = None  # the digest of the program the engine runs
        self.refusals = 0                # programs refused in this process
        self._request = (0.0, PROGRAM_REQUEST_S[0])  # (when the wait for a program started / last asked, wait)

    def reset(self) -> None:
        """A new run instance: it announces its own programs (the cache is kept: digests name content)."""
        self.announced, self.refused, self.received, self.current = [], set(), None, None

    def note(self, digests) -> None:
        """``edge_programs`` of a recipe frame: a list of hex SHA-256 digests; anything else is ignored."""
        if isinstance(digests, list):
            fresh = [d for d in digests[:MAX_ANNOUNCED_PROGRAMS]
                     if is_digest(d) and d not in self.announced and d not in self.refused]
            self.announced = (self.announced + fresh)[-MAX_ANNOUNCED_PROGRAMS:]

    def receive(self, blob: bytes) -> None:
        """A completed ``edge_program`` transfer, kept until judged. Raises ProgramError when oversized."""
        check_program_size(blob)
        self.received = (program_digest(blob), blob)

    def candidates(self) -> Iterator[tuple[str, bytes]]:
        """(digest, blob) of each announced, unrefused program at hand: the received one first (judged once it
        is announced; until then it is held), then cached ones, newest announcement first. Each blob is hashed
        once."""
        if self.received is not None:
            digest, blob = self.received
            if digest in self.announced:
                self.received = None
                if digest not in self.refused:
                    yield digest, blob
        for digest in reversed(list(self.announced)):
            blob = None if digest in self.refused else self.cache.load(digest)
            if blob:
                yield digest, blob

    def build(self, edge: dict, make: Callable[[EdgeProgram], Engine]) -> Engine | None:
        """An engine (``make(program)``) from the first candidate whose manifest's ``edge`` is ``edge`` (the
        device's recipe: another is another device's or recipe's program); None if none is at hand. A program
        that fails to unpack or build (ProgramError, onnxruntime refusing a graph, ...) is refused. The one
        built from is cached and becomes :attr:`current`."""
        for digest, blob in self.candidates():
            try:
                program = unpack_program(blob, digest)
                if program.manifest.get("edge") != edge:
                    continue
                engine = make(program)
            except Exception as e:  # whatever the downlink carried, the device keeps running
                self.refuse(digest, f"{type(e).__name__}: {str(e)[:300]}")
                continue
            self.cache.save(blob)
            self.current = digest
            logger.info("%s: edge program %s (%s, %d graphs, %.0f KB) loaded; engine onnxruntime", self.device,
                        digest[:12], program.manifest["trainer"], len(program.graphs), len(blob) / 1024)
            return engine
        return None

    def refuse(self, digest: str, why: str) -> bool:
        """Never run ``digest`` again in this run (``why``: logged); removes it from the cache. True if it was
        the current one (the engine built from it must go)."""
        logger.error("%s: edge program %s refused: %s", self.device, digest[:12], why)
        self.refusals += 1
        self.refused.add(digest)
        self.announced = [d for d in self.announced if d != digest]
        try:
            self.cache.path(digest).unlink(missing_ok=True)
        except (OSError, ProgramError):
            pass
        was_current = self.current == digest
        if was_current:
            self.current = None
        return was_current

    def request_due(self, now: float | None = None) -> bool:
        """Still no program: True when it is time to ask again (a transfer may have been lost), with a wait
        that starts at 150 s and doubles up to 1200 s. The first call starts the clock."""
        now = time.monotonic() if now is None else now
        last, wait = self._request
        if not last:
            self._request = (now, wait)
            return False
        if now - last <= wait:
            return False
        self._request = (now, min(2 * wait, PROGRAM_REQUEST_S[1]))
        return True


def check_program_size(blob: bytes) -> None:
    """Raises ProgramError for a program larger than :data:`MAX_PROGRAM_BYTES`."""
    if len(blob) > MAX_PROGRAM_BYTES:
        raise ProgramError(f"edge program of {len(blob)} bytes (at most {MAX_PROGRAM_BYTES})")
