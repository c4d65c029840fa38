"""A device's cache of edge programs, by digest: what the runtime sent (or an operator installed offline for
an air-gapped fleet) is reused at every restart without a transfer. Torch-free."""
from __future__ import annotations

import logging
import os
import re
import stat
from pathlib import Path

from edge_sdk.program.format import MAX_PROGRAM_BYTES, EdgeProgram, ProgramError, program_digest, unpack_program

logger = logging.getLogger("edgefl.agent")
_DIGEST = re.compile(r"[0-9a-f]{64}")
SUFFIX = ".edgeprog"


def is_digest(value) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None


class ProgramCache:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory)

    def path(self, digest: str) -> Path:
        if not is_digest(digest):  # names a file: never a path from the wire
            raise ProgramError(f"not a program digest: {str(digest)[:80]!r}")
        return self.directory / f"{digest}{SUFFIX}"

    def load(self, digest: str) -> bytes | None:
        """The cached blob of ``digest`` if present and intact (a damaged one is removed)."""
        path = self.path(digest)
        try:
            blob = path.read_bytes()
        except OSError:
            return None
        if program_digest(blob) != digest:
            logger.warning("%s: damaged cached edge program removed", path)
            path.unlink(missing_ok=True)
            return None
        return blob

    def save(self, blob: bytes) -> str:
        digest = program_digest(blob)
        path = self.path(digest)
        if self.load(digest) is None:  # absent, or damaged (load removed it): write it
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())  # an SD card that loses power keeps the old file or the whole new one
            os.replace(tmp, path)
        return digest

    def install(self, file: str | Path) -> tuple[str, EdgeProgram]:
        """Check a program file (as a transfer would be checked) and cache it; returns (digest, program).
        Raises ProgramError or OSError."""
        with open(file, "rb") as f:  # a regular file, read at most one byte past the limit
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ProgramError(f"{file}: not a regular file")
            blob = f.read(MAX_PROGRAM_BYTES + 1)
        if len(blob) > MAX_PROGRAM_BYTES:
            raise ProgramError(f"{file}: larger than an edge program may be ({MAX_PROGRAM_BYTES} bytes)")
        program = unpack_program(blob)
        return self.save(blob), program
