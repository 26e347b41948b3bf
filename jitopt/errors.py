"""Errors jitopt raises, each carrying where it happened."""

from __future__ import annotations


class JitoptError(RuntimeError):
    """An internal compile error, with the stage (pass, partition) it came from."""

    def __init__(self, message: str, *, stage: str | None = None, node: str | None = None):
        where = f" in {stage}" if stage else ""
        at = f"\n  at node: {node}" if node else ""
        super().__init__(f"jitopt failed{where}: {message}{at}")
        self.stage = stage
        self.node = node


class JitoptFallbackWarning(UserWarning):
    """A graph or partition ran on ATen because compiling it failed."""


class Declined(Exception):
    """A lowering target cannot express a partition it was offered (an op or a layout it does
    not lower). Not an error: the partition runs on ATen, without a warning."""
