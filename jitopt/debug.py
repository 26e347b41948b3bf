"""Logger, counters and numbered dumps: how jitopt shows what it did."""

from __future__ import annotations

import collections
import itertools
import logging
import os
from pathlib import Path

log = logging.getLogger("jitopt")

# counters["passes"]["fold_conv_bn"] == 2 proves a rewrite fired; tests assert them.
# Groups: "passes" (rewrites per pass), "graphs" (captured, compiled_*, recompiled_for_weights),
# "fallbacks" (graphs or partitions that ran on ATen after an error), "targets".
counters: collections.defaultdict[str, collections.Counter[str]] = collections.defaultdict(
    collections.Counter)


def reset_counters() -> None:
    counters.clear()


_graph_ids = itertools.count()


class DumpDir:
    """Numbered files for one graph under debug_dir: 000_captured.py, 001_<pass>.py, ..."""

    def __init__(self, debug_dir: str | None, label: str) -> None:
        self.path: Path | None = None
        self._seq = itertools.count()
        if debug_dir:
            self.path = Path(debug_dir) / f"{label}_{next(_graph_ids):03d}_{os.getpid()}"
            self.path.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, text: str | None = None, *, lazy=None) -> None:
        """Write `text` (or the string `lazy()` returns, only when dumping is on)."""
        if self.path is None:
            return
        body = text if text is not None else lazy()
        (self.path / f"{next(self._seq):03d}_{name}").write_text(body)
