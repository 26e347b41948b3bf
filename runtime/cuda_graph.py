"""Replaying a compiled graph from one captured CUDA graph.

Launched one by one from Python, a graph's kernels cost tens of microseconds each to start,
more than many of them take to run on a GPU. Captured once, the whole graph starts with one
call. What replay changes, and how it stays safe:

- An input that was the same tensor in every warm-up call (a weight that is not frozen, or
  a buffer the caller refills) is read where it lives; the others are copied into buffers
  the capture read. Shapes and strides are fixed (only graphs without symbolic sizes are
  captured); a call that does not match, or whose in-place input moved, runs uncaptured.
- Outputs are copied out of the capture's buffers, which the next replay overwrites, so a
  returned tensor is never changed behind the caller's back.
- A graph whose output shares memory with an input (a view the caller may rely on aliasing)
  is never captured. Neither is one the capture rejects (a host sync, a copy from the CPU):
  it runs uncaptured from then on, with a warning.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch

WARMUP_CALLS = 2  # uncaptured first calls: Triton compiles, cuBLAS picks its kernels
counters = {"captured": 0, "replayed": 0, "declined": 0}


class CudaGraphRunner:
    """Wraps a boxed graph function `run(args)` whose tensor inputs at `live` live on CUDA;
    the other inputs (frozen weights compiled in as constants) are not read."""

    def __init__(self, run: Callable[[list], Any], live: Sequence[int]) -> None:
        self.run, self.live = run, tuple(live)
        self.calls = 0
        self.seen_ptrs: list[tuple[int, ...]] = []  # the live inputs' addresses per warm-up
        self.copied: tuple[int, ...] = ()
        self.stable_ptrs: dict[int, int] = {}
        self.layouts: dict[int, tuple] = {}
        self.disabled = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_args: list[Any] = []
        self.static_out: tuple[torch.Tensor, ...] = ()

    def __call__(self, args: list) -> Any:
        if self.disabled or (self.graph is not None and not self._fits(args)):
            return self.run(args)
        if self.graph is None:
            self.calls += 1
            if self.calls <= WARMUP_CALLS:
                return self._warm_up(args)
            self._capture(args)
            if self.graph is None:
                return self.run(args)
        for i in self.copied:
            self.static_args[i].copy_(args[i])
        args.clear()  # the boxed convention: the caller's references go with the call
        self.graph.replay()
        counters["replayed"] += 1
        return tuple(out.clone() for out in self.static_out)

    def _warm_up(self, args: list) -> Any:
        self.seen_ptrs.append(tuple(args[i].data_ptr() for i in self.live))
        inputs = [args[i].untyped_storage().data_ptr() for i in self.live]
        out = self.run(args)
        outputs = out if isinstance(out, (list, tuple)) else [out]
        if any(not isinstance(o, torch.Tensor) or not o.is_cuda
               or o.untyped_storage().data_ptr() in inputs for o in outputs):
            self._decline("an output is not a fresh CUDA tensor (it aliases an input, or is "
                          "not a tensor on the GPU)")
        return out

    def _capture(self, args: list) -> None:
        now = tuple(args[i].data_ptr() for i in self.live)
        stable = {i for k, i in enumerate(self.live)
                  if all(ptrs[k] == now[k] for ptrs in self.seen_ptrs)}
        self.copied = tuple(i for i in self.live if i not in stable)
        # Stable inputs are read where they are; only their address is kept (holding the
        # tensor would keep a caller's recycled block from coming back to the same address).
        self.stable_ptrs = {i: args[i].data_ptr() for i in stable}
        self.layouts = {i: (args[i].shape, args[i].stride(), args[i].dtype, args[i].device)
                        for i in self.live}
        self.static_args = [a.clone() if i in self.copied else a for i, a in enumerate(args)]
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                self.run(list(self.static_args))  # allocations settle before the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = self.run(list(self.static_args))
        except Exception as error:  # noqa: BLE001 - the capture's failure is not the user's
            self._decline(f"capture failed ({type(error).__name__}: {error})")
            return
        if not isinstance(out, tuple):
            self._decline(f"the graph returns a {type(out).__name__}, not a tuple")
            return
        for i in stable:
            self.static_args[i] = None
        self.graph, self.static_out = graph, out
        counters["captured"] += 1

    def _fits(self, args: list) -> bool:
        return (all(args[i].data_ptr() == ptr for i, ptr in self.stable_ptrs.items())
                and all((a.shape, a.stride(), a.dtype, a.device) == self.layouts[i]
                        for i, a in ((i, args[i]) for i in self.live)))

    def _decline(self, why: str) -> None:
        self.disabled = True
        self.static_args = []
        counters["declined"] += 1
        warnings.warn(f"jitopt: this graph runs without a CUDA graph: {why}", stacklevel=3)
