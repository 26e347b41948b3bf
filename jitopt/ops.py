"""jitopt's own operators (`torch.ops.jitopt.*`): what passes rewrite to when no ATen op
says it. Each has a reference implementation in ATen ops, which is what runs when no target
claims the node (always correct, not fast), and a fake one for shape propagation. Imported by
passes (to emit them), codegen (to lower them) and runtime (to run the reference), and by
nothing heavier than torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Output channels per block of a packed int8 weight: one 64-byte load per input channel
# gives a kernel four AVX-512 vectors of weights.
INT8_BLOCK = 64


def pack_int8_weight(wq: torch.Tensor) -> torch.Tensor:
    """[N, K] int8 -> [ceil(N / 64), K, 64]: blocks of 64 output channels, each stored input
    channel by input channel, so a kernel streams a block front to back. Channels past N are
    zeros."""
    n, k = wq.shape
    blocks = -(-n // INT8_BLOCK)
    padded = torch.zeros(blocks * INT8_BLOCK, k, dtype=torch.int8)
    padded[:n] = wq
    return padded.view(blocks, INT8_BLOCK, k).transpose(1, 2).contiguous()


def unpack_int8_weight(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_int8_weight: [N, K] int8."""
    blocks, k, _ = packed.shape
    return packed.transpose(1, 2).reshape(blocks * INT8_BLOCK, k)[:n]


@torch.library.custom_op("jitopt::linear_int8_weight", mutates_args=())
def linear_int8_weight(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (unpack(weight) * scale[:, None]).T (+ bias): a linear layer over an int8
    weight packed by pack_int8_weight, with one float32 scale per output channel (N =
    scale's length). x is float32 [M, K]; y float32 [M, N]. This reference dequantizes the
    whole weight on every call; the CPU target runs a kernel that reads it as int8."""
    weight_float = unpack_int8_weight(weight, scale.shape[0]).float() * scale[:, None]
    return F.linear(x, weight_float, bias)


@linear_int8_weight.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
      bias: torch.Tensor | None = None) -> torch.Tensor:
    torch._check(x.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: f"linear_int8_weight: x {tuple(x.shape)} against a packed weight "
                         f"{tuple(weight.shape)}")
    return x.new_empty(x.shape[0], scale.shape[0])
