"""Lowering targets: each says which nodes it can take and turns a partition into an artifact."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import torch.fx as fx

from jitopt.errors import Declined  # noqa: F401  (re-exported: targets raise it)


class Target(Protocol):
    name: str

    def supports(self, node: fx.Node) -> bool:
        """Can this target run `node`?"""

    def lower(self, partition: fx.GraphModule) -> Callable[..., Any]:
        """Compile a partition (a GraphModule of supported nodes) into a callable that takes its
        placeholders positionally and returns its outputs as a tuple."""


class AtenTarget:
    """Runs nodes as ATen calls inline in the generated wrapper: always available, always right."""

    name = "aten"

    def supports(self, node: fx.Node) -> bool:
        return True

    def lower(self, partition: fx.GraphModule) -> Callable[..., Any]:
        return partition


TARGETS: dict[str, Target] = {}


def register_target(target: Target) -> Target:
    if target.name in TARGETS:
        raise ValueError(f"a lowering target named {target.name!r} is already registered")
    TARGETS[target.name] = target
    return target


def unregister_target(name: str) -> None:
    if name == "aten":
        raise ValueError("the aten target cannot be removed: it is every graph's fallback")
    TARGETS.pop(name)


register_target(AtenTarget())


def _register_builtin_targets() -> None:
    from jitopt.codegen.cpp_target import CppTarget
    from jitopt.codegen.triton_target import TritonTarget

    register_target(CppTarget())
    register_target(TritonTarget())


_register_builtin_targets()
