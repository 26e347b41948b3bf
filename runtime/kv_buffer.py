"""Growable key/value cache buffers: `torch.cat([cache, new], dim)` without copying the cache.

A decode step appends one token's keys and values per layer; `torch.cat` copies the whole
cache to do it, so a step costs more the longer the sequence. `append` returns the same values
as that cat, but as a view of a buffer with spare capacity along `dim`, writing only the new
positions when `cache` is exactly the valid prefix of such a buffer (the previous step's
result). Semantics stay those of cat: nothing any existing tensor shows is ever written. When
`cache` is not that frontier (the first step, a new prompt, a fork of one prefix into two
continuations, beam search reordering) the values are copied into a fresh buffer.

A buffer is laid out like the cat result would be, with its capacity in place of the length
(for Hugging Face's [B, H, S, D]: each head's keys stay contiguous, which attention reads
1.6x faster than the keys of all heads interleaved). Its views' outer strides therefore
depend on the capacity, and Dynamo, which guards on strides, recompiles a decode step once
when they first change, then treats them as symbolic. So that this happens in the first
steps of the first generation rather than mid-way through a long one, a cache that is not
ours yet gets an exact-size buffer (strides as cat's), and the next step moves it to a
growable one.
"""

from __future__ import annotations

import threading
import weakref

import torch

MIN_CAPACITY = 64  # positions; a buffer then doubles, so memory stays within 2x the tokens


class _Buffer:
    """A buffer's base tensor (weakly: the views handed out keep it alive) and how many
    positions along `dim` are valid, i.e. already shown by some view."""

    def __init__(self, base: torch.Tensor, dim: int, valid: int) -> None:
        self.base, self.dim, self.valid = weakref.ref(base), dim, valid


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
        if base is not None and base.shape[dim] >= total and _same_other_sizes(cache, new, dim):
            base.narrow(dim, length, new.shape[dim]).copy_(new)
            state.valid = total
            counters["appended_in_place"] += 1
            return base.narrow(dim, 0, total)
    if max_tokens is not None and total > max_tokens:
        return torch.cat([cache, new], dim)
    return _fresh(cache, new, dim, total, max_tokens, exact=state is None)


def _frontier(cache: torch.Tensor, dim: int) -> _Buffer | None:
    """The buffer whose valid prefix `cache` is exactly, if any."""
    base = cache._base
    state = _buffers.get(id(base)) if base is not None else None
    if state is None or state.base() is not base or state.dim != dim:
        return None
    if (cache.data_ptr() != base.data_ptr() or cache.stride() != base.stride()
            or state.valid != cache.shape[dim]):
        return None
    return state


def _same_other_sizes(cache: torch.Tensor, new: torch.Tensor, dim: int) -> bool:
    return (cache.dtype == new.dtype and cache.device == new.device and cache.dim() == new.dim()
            and all(cache.shape[d] == new.shape[d] for d in range(cache.dim()) if d != dim))


def _fresh(cache: torch.Tensor, new: torch.Tensor, dim: int, total: int,
           max_tokens: int | None, exact: bool) -> torch.Tensor:
    if not _same_other_sizes(cache, new, dim):
        return torch.cat([cache, new], dim)  # broadcasting or promotion: leave it to cat
    capacity = total if exact else MIN_CAPACITY
    while capacity < total:
        capacity *= 2
    if max_tokens is not None:
        capacity = max(total, min(capacity, max_tokens))
    shape = list(cache.shape)
    shape[dim] = capacity
    base = torch.empty(shape, dtype=cache.dtype, device=cache.device)
    base.narrow(dim, 0, cache.shape[dim]).copy_(cache)
    base.narrow(dim, cache.shape[dim], new.shape[dim]).copy_(new)
    key = id(base)
    with _lock:
        _buffers[key] = _Buffer(base, dim, total)
    weakref.finalize(base, _buffers.pop, key, None)
    counters["copied"] += 1
    return base.narrow(dim, 0, total)


def held_buffers() -> int:
    """How many buffers are alive (for tests: they go when their views go)."""
    return len(_buffers)
