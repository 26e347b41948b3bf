"""Load compiled kernel libraries and build the Python launchers that call them."""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import sys
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from jitopt.errors import JitoptFallbackWarning


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


# Outputs at least this big are backed by 2 MB pages where the kernel allows it. A fresh large
# buffer is mapped untouched, and faulting it in 4 KB at a time costs more than the kernel
# writing it (a 64 MB copy into new memory: 18 ms with 4 KB pages, 4 ms with 2 MB pages).
HUGE_PAGE_MIN_BYTES = 4 << 20
_HUGE_PAGE = 2 << 20
_MADV_HUGEPAGE = 14


def _madvise() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux") or os.environ.get("JITOPT_HUGE_PAGES") == "0":
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


_madvise_fn = _madvise()


def huge_pages(t: torch.Tensor) -> torch.Tensor:
    """Ask the kernel to back `t`'s whole 2 MB-aligned pages with huge pages (transparent huge
    pages in madvise mode; a no-op where unsupported). Call before anything writes `t`."""
    if _madvise_fn is not None and t.nbytes >= HUGE_PAGE_MIN_BYTES:
        start = t.data_ptr()
        first = (start + _HUGE_PAGE - 1) & ~(_HUGE_PAGE - 1)
        last = (start + t.nbytes) & ~(_HUGE_PAGE - 1)
        if last > first:
            _madvise_fn(first, last - first, _MADV_HUGEPAGE)  # advice: failure is harmless
    return t


class RecycledOutput:
    """The memory of one large kernel output, handed out again by the next call once every
    tensor on it is gone. A fresh large buffer costs the OS a zeroed page per 4 KB (most of a
    memory-bound kernel's time: a 64 MB output takes longer to fault in than to compute), and
    glibc returns such buffers to the OS on free, so every call would pay again.

    The buffer is reused only when this object holds the sole reference to its storage: an
    output the caller kept, or any view of it, keeps the storage's use count above one, and the
    call then allocates afresh. The lock makes the check-and-take atomic across threads. At
    most one buffer per output is kept: the memory of one call's outputs stays mapped."""

    __slots__ = ("storage", "lock")

    def __init__(self) -> None:
        self.storage: torch.UntypedStorage | None = None
        self.lock = threading.Lock()

    def __call__(self, shape: tuple[int, ...], strides: tuple[int, ...],
                 dtype: torch.dtype) -> torch.Tensor:
        needed = _extent(shape, strides) * dtype.itemsize
        if needed < HUGE_PAGE_MIN_BYTES:
            return torch.empty_strided(shape, strides, dtype=dtype)
        with self.lock:
            storage = self.storage
            # Private: the only way to see a storage's reference count (one module, here).
            if (storage is not None and torch._C._storage_Use_Count(storage._cdata) == 1
                    and storage.nbytes() >= needed):
                return torch.empty(0, dtype=dtype).set_(storage, 0, shape, strides)
            fresh = huge_pages(torch.empty_strided(shape, strides, dtype=dtype))
            self.storage = fresh.untyped_storage()
            return fresh


def _extent(shape: tuple[int, ...], strides: tuple[int, ...]) -> int:
    """Elements spanned by a strided layout."""
    if any(s == 0 for s in shape):
        return 0
    return 1 + sum((size - 1) * stride for size, stride in zip(shape, strides))


def build_launcher(source: str, name: str, kernel: Callable[..., None],
                   outputs: int = 0) -> Callable[..., Any]:
    """Execute a generated launcher's source (see codegen/cpp_target.py) with its kernel and
    one RecycledOutput per output (`recycled0`, ...)."""
    namespace: dict[str, Any] = {"torch": torch, "kernel": kernel, "relayout": relayout,
                                 "empty_strided": torch.empty_strided, "huge_pages": huge_pages}
    namespace.update({f"recycled{k}": RecycledOutput() for k in range(outputs)})
    exec(compile(source, f"<jitopt launcher {name}>", "exec"), namespace)
    return namespace[name]


class DeferredLauncher:
    """A kernel whose library the compiler is still building in the background: calls run the
    partition's ATen ops (`fallback`) until the build is done, then the launcher `finish`
    makes from the built library. A failed build warns once and keeps the ATen ops."""

    def __init__(self, build: "concurrent.futures.Future[Path]",
                 finish: Callable[[Path], Callable[..., Any]],
                 fallback: Callable[..., Any], on_ready: Callable[[Callable[..., Any]], None]
                 ) -> None:
        self.build, self.finish, self.fallback, self.on_ready = build, finish, fallback, on_ready
        self.lock = threading.Lock()
        self.launcher: Callable[..., Any] | None = None

    def __call__(self, *args: Any, **outputs: Any) -> Any:
        if self.launcher is None and not self.build.done():
            return self._run_fallback(args)  # the memory plan's `outputs` are not used
        return self._ready()(*args, **outputs)

    def _run_fallback(self, args: tuple) -> Any:
        """The ATen ops' results, each in its own memory as a kernel's would be: the memory
        plan reuses a kernel output's buffer after its last use, so one that is a view of an
        input or of another output must be copied."""
        result = self.fallback(*args)
        single = not isinstance(result, tuple)
        taken = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        fresh = []
        for out in (result,) if single else result:
            if isinstance(out, torch.Tensor):
                if out.untyped_storage().data_ptr() in taken:
                    out = out.clone()
                taken.add(out.untyped_storage().data_ptr())
            fresh.append(out)
        return fresh[0] if single else tuple(fresh)

    def _ready(self) -> Callable[..., Any]:
        with self.lock:
            if self.launcher is None:
                try:
                    self.launcher = self.finish(self.build.result())
                except Exception as e:
                    warnings.warn(f"jitopt: building generated kernels in the background "
                                  f"failed; those partitions keep running on ATen: "
                                  f"{type(e).__name__}: {e}", JitoptFallbackWarning,
                                  stacklevel=3)
                    self.launcher = lambda *args, **outputs: self._run_fallback(args)
                self.on_ready(self.launcher)
            return self.launcher
