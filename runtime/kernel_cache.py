"""On-disk cache of compiled kernel libraries, safe under crashes and concurrent processes.

Each entry is one file named by its key: the library's bytes followed by their SHA-256. The
dynamic loader ignores bytes past the ELF contents, so the file loads as is, and a truncated or
corrupted entry fails its check and is rebuilt instead of crashing the process. Entries are
written to a temporary file in the same directory and renamed into place, so a reader sees
either no entry or a whole one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

_DIGEST = 32


def default_cache_dir() -> Path:
    """$JITOPT_CACHE_DIR, else $XDG_CACHE_HOME/jitopt, else ~/.cache/jitopt."""
    if os.environ.get("JITOPT_CACHE_DIR"):
        return Path(os.environ["JITOPT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "jitopt"


class KernelCache:
    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else default_cache_dir()

    def path(self, key: str, suffix: str) -> Path:
        return self.root / key[:2] / f"{key}{suffix}"

    def lookup(self, key: str, suffix: str) -> Path | None:
        """The entry's path when it exists and is intact; a damaged entry is removed."""
        path = self.path(key, suffix)
        try:
            data = path.read_bytes()
        except OSError:
            return None
        if len(data) > _DIGEST and hashlib.sha256(data[:-_DIGEST]).digest() == data[-_DIGEST:]:
            return path
        path.unlink(missing_ok=True)
        return None

    def store(self, key: str, suffix: str, data: bytes) -> Path:
        path = self.path(key, suffix)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data + hashlib.sha256(data).digest())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path
