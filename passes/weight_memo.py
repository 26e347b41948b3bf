"""Per-weight results of a quantize pass, computed once per process while the weight lives.

Generation compiles several graphs over the same frozen weights (a prefill graph, decode
graphs); each would round, pack and measure every weight again (seconds for GPT-2) and hold
its own copy of the result. Entries are keyed by the weight's storage (held weakly: an
entry goes when its weight is freed), its layout, its version counter (a weight changed in
place is a new key, and its older entries are dropped) and the pass's parameters. Safe to
share: the results are constants no compiled graph writes."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import torch

T = TypeVar("T")
_MEMO: dict[tuple, tuple[weakref.ref, Any]] = {}


def per_weight(kind: str, weight: torch.Tensor, compute: Callable[[], T],
               *params: Hashable) -> T:
    """compute(), or its result from an earlier call for this weight, kind and params."""
    storage = weight.untyped_storage()
    where = (kind, params, id(storage), weight.storage_offset(), tuple(weight.shape),
             weight.stride(), weight.dtype)
    key = (*where, weight._version)
    entry = _MEMO.get(key)
    if entry is not None and entry[0]() is storage:
        return entry[1]
    for stale in [k for k in _MEMO if k[:-1] == where]:  # the same weight, changed since
        del _MEMO[stale]
    value = compute()
    _MEMO[key] = (weakref.ref(storage), value)
    weakref.finalize(storage, _MEMO.pop, key, None)
    return value
