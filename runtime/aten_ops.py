"""Resolve the names generated wrappers use for ops back to callables, without the compiler."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

import torch


def aten_op(qualname: str) -> Callable[..., Any]:
    """`"aten::addmm.default"` -> the op's C++ entry point.

    OpOverload._op skips OpOverload.__call__'s Python frame (about 1 us per call); tensor
    subclasses still reach __torch_dispatch__ through the dispatcher. Private: only here."""
    namespace, rest = qualname.split("::")
    if namespace == "jitopt":  # our own ops register when their module is imported
        importlib.import_module("jitopt.ops")
    name, overload = rest.rsplit(".", 1)
    op = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    return getattr(op, "_op", op)


def python_function(path: str) -> Callable[..., Any]:
    """`"operator.mul"` or `"torch.sym_float"` -> that function."""
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)
