"""Load compiled kernel libraries and build the Python launchers that call them."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def load_kernel(path: Path, name: str, pointers: int, sizes: int) -> Callable[..., None]:
    """The `extern "C"` kernel `name`: `pointers` data pointers, then `sizes` int64 sizes."""
    library = ctypes.CDLL(str(path))
    fn = getattr(library, name)
    fn.argtypes = [ctypes.c_void_p] * pointers + [ctypes.c_int64] * sizes
    fn.restype = None
    return fn


def relayout(t: torch.Tensor, strides: tuple[int, ...]) -> torch.Tensor:
    """A copy of `t` with the strides a kernel was compiled for (the kernel trusts them)."""
    return torch.empty_strided(t.shape, strides, dtype=t.dtype, device=t.device).copy_(t)


def build_launcher(source: str, name: str, kernel: Callable[..., None]) -> Callable[..., Any]:
    """Execute a generated launcher's source (see codegen/cpp_target.py) with its kernel."""
    namespace: dict[str, Any] = {"torch": torch, "kernel": kernel, "relayout": relayout,
                                 "empty_strided": torch.empty_strided, "empty": torch.empty}
    exec(compile(source, f"<jitopt launcher {name}>", "exec"), namespace)
    return namespace[name]
