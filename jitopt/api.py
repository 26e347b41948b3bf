"""The decorator and the training-to-inference entry point."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from jitopt.compiler import backend
from jitopt.config import Config

F = TypeVar("F", bound=Callable[..., Any])


def optimize(fn: F | None = None, /, **options: Any) -> F | Callable[[F], F]:
    """Compile an inference function or module with jitopt; calls run under
    `torch.inference_mode()`. Use bare (`@jitopt.optimize`) or with options
    (`@jitopt.optimize(on_error="raise")`); options are `jitopt.Config` fields."""
    Config.from_options(options)  # a bad option fails here, at decoration time

    def wrap(target: F) -> F:
        compiled = torch.compile(target, backend=backend, options=options or None)
        if isinstance(target, torch.nn.Module):
            return _InferenceModule(target, compiled)

        @functools.wraps(target)
        def run(*args: Any, **kwargs: Any) -> Any:
            with torch.inference_mode():
                return compiled(*args, **kwargs)
        return run

    return wrap(fn) if fn is not None else wrap


def for_inference(model: torch.nn.Module, **options: Any) -> torch.nn.Module:
    """Turn a trained model into a compiled inference model.

    The original `model` is switched to eval mode in place (dropout off, BatchNorm uses its
    running statistics) and otherwise left untouched: its parameters keep `requires_grad`
    and are shared, not copied. The returned module runs under `torch.inference_mode()` with
    weights frozen as constants, so BatchNorm folds into the conv/linear before it and dropout
    is removed. Changing the original's weights later (an optimizer step, `load_state_dict`)
    is detected on the next call and the graph recompiles; the answer is never stale.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"for_inference takes an nn.Module, got {type(model).__name__}")
    options.setdefault("freeze_weights", True)
    Config.from_options(options)
    model.eval()
    return _InferenceModule(model, torch.compile(model, backend=backend, options=options))


class _InferenceModule(torch.nn.Module):
    """The compiled module, called under inference mode; `.original` is the user's module."""

    def __init__(self, original: torch.nn.Module, compiled: Callable[..., Any]) -> None:
        super().__init__()
        self.original = original
        self._compiled = compiled

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with torch.inference_mode():
            return self._compiled(*args, **kwargs)


def finish_compiles(timeout: float | None = None) -> None:
    """Wait until every generated kernel started building in the background is built, so the
    calls that follow run it (see the `background_compile` option). For benchmarks and
    services that warm up before taking traffic."""
    from jitopt.codegen.cpp_target import finish_background_builds

    finish_background_builds(timeout)
