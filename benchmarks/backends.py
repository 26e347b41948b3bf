"""The columns: how each backend turns the model into the callable that gets timed."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn as nn

Prepare = Callable[[nn.Module, tuple, int, str], Callable[..., Any]]


class Unavailable(Exception):
    """This backend cannot run this model here; str() is the reason shown in the table."""


@dataclasses.dataclass
class Backend:
    name: str
    prepare: Prepare  # (model, inputs, threads, kind) -> forward callable to time
    compile_context: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    verify: Callable[[], str | None] = lambda: None  # after compiling: an error, or None


def _target(model: nn.Module, kind: str) -> Callable[..., Any]:
    # Generation calls forward many times from Python (HF generate): compile forward itself.
    return model.forward if kind == "generate" else model


def eager(model, inputs, threads, kind):
    return _target(model, kind)


def torch_compile(**kwargs: Any) -> Prepare:
    def prepare(model, inputs, threads, kind):
        return torch.compile(_target(model, kind), **kwargs)
    return prepare


class _CountCalls:
    """Counts calls to a module-level function while active (to prove a peer ran as named)."""

    def __init__(self, module: Any, name: str) -> None:
        self.module, self.name, self.calls = module, name, 0

    @contextlib.contextmanager
    def active(self) -> Iterator[None]:
        original = getattr(self.module, self.name)

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        setattr(self.module, self.name, counted)
        try:
            yield
        finally:
            setattr(self.module, self.name, original)


def inductor_freezing() -> Backend:
    """Inductor with freezing. torch.compile(options={"freezing": True}) is silently ignored in
    this torch (Dynamo reads the global config), so patch the global while compiling, and check
    that Inductor's freeze() really ran."""
    import torch._inductor.config
    import torch._inductor.freezing

    freeze = _CountCalls(torch._inductor.freezing, "freeze")

    @contextlib.contextmanager
    def context() -> Iterator[None]:
        with torch._inductor.config.patch(freezing=True), freeze.active():
            yield

    def verify() -> str | None:
        return None if freeze.calls else "Inductor's freeze() never ran: not a freezing column"

    # The options only make this torch.compile wrapper differ from plain Inductor's, so Dynamo
    # compiles anew instead of reusing the unfrozen graph cached for the "inductor" column.
    return Backend("inductor-freezing", torch_compile(options={"freezing": True}), context,
                   verify)


def quantize_dynamic(model, inputs, threads, kind):
    """Eager int8 dynamic quantization of nn.Linear: the int8 reference users reach for."""
    quantized = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                       dtype=torch.qint8)
    return _target(quantized, kind)


def jitopt_int8_static(model, inputs, threads, kind):
    """jitopt.calibrate on 4 batches drawn like the inputs (not the timed ones), then
    quantize="int8-static"."""
    import jitopt

    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise Unavailable("int8-static quantizes convolutions; this model has none")
    draw = torch.Generator().manual_seed(1)
    batches = [tuple(torch.randn(x.shape, generator=draw) if x.is_floating_point() else x
                     for x in inputs) for _ in range(4)]
    jitopt.calibrate(model, batches)
    return torch.compile(_target(model, kind), backend="jitopt",
                         options={"quantize": "int8-static"})


def _exported(factory: Callable[..., Any]) -> Prepare:
    def prepare(model, inputs, threads, kind):
        if kind == "generate":
            raise Unavailable("export-based engine runs one exported forward, not a decode loop")
        return factory(model, inputs, threads)
    return prepare


def all_backends() -> dict[str, Backend]:
    from jitopt.config import PRESETS, QUANTIZE_IMPLEMENTED

    # "dynamo" (Dynamo capture, graphs run eagerly) shows what the capture alone costs every
    # torch.compile backend; running it first also takes Dynamo's one-time warm-up off the
    # compilers' cold-compile columns.
    backends = [Backend("eager", eager), Backend("dynamo", torch_compile(backend="eager")),
                Backend("inductor", torch_compile()), inductor_freezing()]
    for mode in PRESETS:  # a new jitopt mode becomes a column by itself
        name = "jitopt" if mode == "default" else f"jitopt-{mode}"
        backends.append(Backend(name, torch_compile(
            backend="jitopt", mode=None if mode == "default" else mode)))
    for mode in QUANTIZE_IMPLEMENTED:  # each implemented quantize= mode, against fp32 eager
        backends.append(Backend(f"jitopt-{mode}", jitopt_int8_static if mode == "int8-static"
                                else torch_compile(backend="jitopt",
                                                   options={"quantize": mode})))
    backends.append(Backend("quantize-dynamic-int8", quantize_dynamic))
    try:
        from benchmarks.peers import PEERS
    except ImportError as e:
        PEERS = {}
        backends.append(Backend("peers", _unavailable(f"benchmarks.peers: {e}")))
    for name, factory in PEERS.items():
        backends.append(Backend(name, _exported(factory)))
    return {b.name: b for b in backends}


def _unavailable(reason: str) -> Prepare:
    def prepare(model, inputs, threads, kind):
        raise Unavailable(reason)
    return prepare
