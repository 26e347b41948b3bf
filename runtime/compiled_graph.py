"""The callable Dynamo (through AOTAutograd) gets back: a generated wrapper plus its bindings."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from jitopt.runtime.aten_ops import aten_op, python_function

_file_ids = itertools.count()


class FrozenInput:
    """A graph input that was compiled in as a constant, and how to tell it has changed."""

    __slots__ = ("index", "tensor", "version", "data_ptr")

    def __init__(self, index: int, tensor: torch.Tensor) -> None:
        self.index = index
        self.tensor = tensor
        self.version = tensor._version
        self.data_ptr = tensor.data_ptr()

    def matches(self, value: Any) -> bool:
        t = self.tensor
        return value is t and t._version == self.version and t.data_ptr() == self.data_ptr


# Whether torch.profiler is recording (private, and the runtime's one use of it: no public
# query exists; 30 ns a call).
_profiler_enabled = torch._C._autograd._profiler_enabled


def _load(source: str, bindings: dict[str, Any], filename: str) -> Callable[[list], Any]:
    """The `run` function of a wrapper's source, its globals the bindings."""
    namespace: dict[str, Any] = {"torch": torch, "aten_op": aten_op,
                                 "python_function": python_function, **bindings}
    exec(compile(source, filename, "exec"), namespace)
    return namespace["run"]


class CompiledGraph:
    """Runs one compiled graph. Takes its inputs as a list (AOTAutograd's boxed convention) so
    the wrapper can drop them as soon as they are dead.

    Frozen inputs are checked on every call (identity, version counter, storage): a weight
    changed in place after compiling calls `on_stale`, which recompiles, instead of silently
    computing with the old value. `cuda_graph_inputs`: replay the graph from a CUDA graph
    (runtime/cuda_graph.py), copying in the inputs at these indices."""

    _boxed_call = True

    def __init__(self, source: str, bindings: dict[str, Any], *, name: str = "graph",
                 frozen: Sequence[FrozenInput] = (),
                 on_stale: Callable[[list], "CompiledGraph"] | None = None,
                 cuda_graph_inputs: Sequence[int] | None = None,
                 profiled_source: str = "") -> None:
        self.source = source
        file_id = next(_file_ids)
        self._run: Callable[[list], Any] = _load(source, bindings, f"<jitopt {name} #{file_id}>")
        if cuda_graph_inputs is not None:  # replay from a captured CUDA graph
            from jitopt.runtime.cuda_graph import CudaGraphRunner

            self._run = CudaGraphRunner(self._run, cuda_graph_inputs)
        # While torch.profiler records: each kernel call named in the trace (codegen's
        # profiled variant of the wrapper; a CUDA graph replays as one).
        self._run_profiled = self._run
        if profiled_source and cuda_graph_inputs is None:
            self._run_profiled = _load(profiled_source, bindings,
                                       f"<jitopt {name} #{file_id}, profiled>")
        self._frozen = tuple(frozen)
        self._on_stale = on_stale

    def __call__(self, args: list) -> Any:
        for f in self._frozen:
            if not f.matches(args[f.index]):
                return self._refresh(args)
        if _profiler_enabled():
            return self._run_profiled(args)
        return self._run(args)

    def _refresh(self, args: list) -> Any:
        if self._on_stale is None:
            raise RuntimeError("a frozen weight changed after compiling and no recompile hook "
                               "was given")
        fresh = self._on_stale(args)
        self._run, self._frozen, self.source = fresh._run, fresh._frozen, fresh.source
        self._run_profiled = fresh._run_profiled
        return self._run(args)
