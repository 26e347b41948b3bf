"""Growable key/value cache buffers: `torch.cat([cache, new], dim)` without copying the cache.

A decode step appends one token's keys and values per layer; `torch.cat` copies the whole
cache to do it, so a step costs more the longer the sequence. `append` returns the same values
as that cat, but as a view of a buffer with spare capacity along `dim`, writing only the new
positions when `cache` is exactly the valid prefix of such a buffer (the previous step's
result). Semantics stay those of cat: nothing any existing tensor shows is ever written. When
`cache` is not that frontier (the first step, a new prompt, a fork of one prefix into two
continuations, beam search reordering) the values are copied into a fresh buffer.

A buffer keeps the sequence dimension outermost ([capacity, *other dims]) and hands out
views with `dim` moved back into place: their strides then do not depend on the capacity, so
growing a buffer does not change them, and Dynamo's stride guards do not recompile the decode
step. For Hugging Face's [B, H, S, D] caches at batch 1 these are also exactly the strides of
the keys a prefill produces (a transpose of [B, S, H, D]).
"""

from __future__ import annotations

import threading
import weakref

import torch

MIN_CAPACITY = 64  # positions; a buffer then doubles, so memory stays within 2x the tokens


class _Buffer:
    """A buffer's base tensor ([capacity, *other dims]; weakly: the views handed out keep it
    alive), the dimension its views put the sequence in, and how many positions are valid,
    i.e. already shown by some view."""

    def __init__(self, base: torch.Tensor, dim: int, valid: int) -> None:
        self.base, self.dim, self.valid = weakref.ref(base), dim, valid
        self.strides = _view(base, dim, valid).stride()


_buffers: dict[int, _Buffer] = {}  # id(base) -> its state (removed when the base dies)
_lock = threading.Lock()
counters = {"appended_in_place": 0, "copied": 0}


def append(cache: torch.Tensor, new: torch.Tensor, dim: int,
           max_tokens: int | None = None) -> torch.Tensor:
    """`torch.cat([cache, new], dim)`, as a view of a buffer this module owns. `max_tokens`
    caps a buffer's capacity; past it this is a plain cat."""
    if type(cache) is not torch.Tensor or type(new) is not torch.Tensor or cache.requires_grad:
        return torch.cat([cache, new], dim)  # fake tensors tracing, or autograd: stay functional
    dim %= cache.dim()
    length, total = cache.shape[dim], cache.shape[dim] + new.shape[dim]
    with _lock:
        state = _frontier(cache, dim)
        base = state.base() if state is not None else None
        if base is not None and base.shape[0] >= total and _same_other_sizes(cache, new, dim):
            base.narrow(0, length, new.shape[dim]).movedim(0, dim).copy_(new)
            state.valid = total
            counters["appended_in_place"] += 1
            return _view(base, dim, total)
    if max_tokens is not None and total > max_tokens:
        return torch.cat([cache, new], dim)
    return _fresh(cache, new, dim, total, max_tokens)


def _frontier(cache: torch.Tensor, dim: int) -> _Buffer | None:
    """The buffer whose valid prefix `cache` is exactly, if any."""
    base = cache._base
    state = _buffers.get(id(base)) if base is not None else None
    if state is None or state.base() is not base or state.dim != dim:
        return None
    if (cache.data_ptr() != base.data_ptr() or cache.stride() != state.strides
            or state.valid != cache.shape[dim]):
        return None
    return state


def _view(base: torch.Tensor, dim: int, length: int) -> torch.Tensor:
    """The first `length` positions of a buffer, with the sequence dimension at `dim`."""
    return base.narrow(0, 0, length).movedim(0, dim)


def _same_other_sizes(cache: torch.Tensor, new: torch.Tensor, dim: int) -> bool:
    return (cache.dtype == new.dtype and cache.device == new.device and cache.dim() == new.dim()
            and all(cache.shape[d] == new.shape[d] for d in range(cache.dim()) if d != dim))


def _fresh(cache: torch.Tensor, new: torch.Tensor, dim: int, total: int,
           max_tokens: int | None) -> torch.Tensor:
    if not _same_other_sizes(cache, new, dim):
        return torch.cat([cache, new], dim)  # broadcasting or promotion: leave it to cat
    capacity = MIN_CAPACITY
    while capacity < total:
        capacity *= 2
    if max_tokens is not None:
        capacity = max(total, min(capacity, max_tokens))
    other = [size for d, size in enumerate(cache.shape) if d != dim]
    base = torch.empty([capacity, *other], dtype=cache.dtype, device=cache.device)
    length = cache.shape[dim]
    base.narrow(0, 0, length).movedim(0, dim).copy_(cache)
    base.narrow(0, length, new.shape[dim]).movedim(0, dim).copy_(new)
    key = id(base)
    with _lock:
        _buffers[key] = _Buffer(base, dim, total)
    weakref.finalize(base, _buffers.pop, key, None)
    counters["copied"] += 1
    return _view(base, dim, total)


def held_buffers() -> int:
    """How many buffers are alive (for tests: they go when their views go)."""
    return len(_buffers)
