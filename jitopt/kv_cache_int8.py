"""An opt-in int8 KV cache for Hugging Face decoders: `past_key_values=jitopt.Int8KVCache(config)`.

The cache's keys and values are part of what the program computes and hands back each step,
so a compiler cannot change their precision behind the program's back: holding them in int8
is the program's choice, made by passing this cache. jitopt then compiles it like any cache:
the int8 appends become in-place appends into a buffer with spare capacity (the KV-cache
rewrite), and the dequantization before attention is one generated kernel per step.

Each token's key (and value) vector of each head is stored as int8 with one float32 scale
(symmetric: amax / 127), so a new token is appended without touching the others: 1 + 4/D
bytes per element instead of 4 (D = head size; 28% of fp32's memory for D = 64). The prompt's
own attention uses its exact keys and values; each later step attends over the rounded ones.
`benchmarks/accuracy.py` reports what that costs a trained model's greedy tokens.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import BaseQuantizedLayer, Cache

INT8_MAX = 127.0


class Int8KVLayer(BaseQuantizedLayer):
    """One layer's keys and values as (int8 [B, H, S, D], float32 scales [B, H, S, 1])."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self._quantized_keys = quantize_per_token(key_states)
        self._quantized_values = quantize_per_token(value_states)

    def _quantize(self, tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return quantize_per_token(tensor)

    def _dequantize(self, quantized: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        values, scales = quantized
        return (values.float() * scales).to(self.keys.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Append the step's keys and values; return all of them (the prompt's exactly)."""
        self.cumulative_length += key_states.shape[-2]
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
            return key_states, value_states
        self._quantized_keys = _appended(self._quantized_keys, quantize_per_token(key_states))
        self._quantized_values = _appended(self._quantized_values,
                                           quantize_per_token(value_states))
        return self._dequantize(self._quantized_keys), self._dequantize(self._quantized_values)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: every token carries its own scale, so rows reorder as they are."""
        if not self.is_initialized:
            return
        self._quantized_keys = tuple(t.index_select(0, beam_idx.to(t.device))
                                     for t in self._quantized_keys)
        self._quantized_values = tuple(t.index_select(0, beam_idx.to(t.device))
                                       for t in self._quantized_values)


class Int8KVCache(Cache):
    """A KV cache holding keys and values in int8 with a scale per token and head, for models
    whose layers all use full attention (GPT-2, Llama, ...)."""

    def __init__(self, config: Any) -> None:
        text = config.get_text_config(decoder=True)
        super().__init__(layers=[Int8KVLayer() for _ in range(text.num_hidden_layers)])


def quantize_per_token(states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., S, D] float -> (int8 [..., S, D], float32 scales [..., S, 1]): symmetric per
    vector, round to nearest."""
    scales = (states.abs().amax(-1, keepdim=True).float() / INT8_MAX).clamp_min(1e-12)
    values = torch.round(states.float() / scales).clamp(-INT8_MAX, INT8_MAX)
    return values.to(torch.int8), scales


def _appended(held: tuple[torch.Tensor, torch.Tensor], new: tuple[torch.Tensor, torch.Tensor]
              ) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.cat([held[0], new[0]], dim=-2), torch.cat([held[1], new[1]], dim=-2))
