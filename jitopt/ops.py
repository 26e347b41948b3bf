"""jitopt's own operators (`torch.ops.jitopt.*`): what passes rewrite to when no ATen op
says it. Each has a reference implementation in ATen ops, which is what runs when no target
claims the node (always correct, not fast), and a fake one for shape propagation. Imported by
passes (to emit them), codegen (to lower them) and runtime (to run the reference), and by
nothing heavier than torch."""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Output channels per block of a packed weight: a kernel widens one input channel's 64
# weights (64 bytes of int8, 128 of bfloat16) to four AVX-512 vectors of floats.
WEIGHT_BLOCK = 64


def pack_weight_blocks(wq: torch.Tensor) -> torch.Tensor:
    """[N, K] -> [ceil(N / 64), K, 64]: blocks of 64 output channels, each stored input
    channel by input channel, so a kernel streams a block front to back. Channels past N are
    zeros. (For int8 and for the 16-bit float formats alike.)"""
    n, k = wq.shape
    blocks = -(-n // WEIGHT_BLOCK)
    padded = torch.zeros(blocks * WEIGHT_BLOCK, k, dtype=wq.dtype, device=wq.device)
    padded[:n] = wq
    return padded.view(blocks, WEIGHT_BLOCK, k).transpose(1, 2).contiguous()


def unpack_weight_blocks(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_weight_blocks: [N, K]."""
    blocks, k, _ = packed.shape
    return packed.transpose(1, 2).reshape(blocks * WEIGHT_BLOCK, k)[:n]


@torch.library.custom_op("jitopt::linear_int8_weight", mutates_args=())
def linear_int8_weight(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ (unpack(weight) * scale[:, None]).T (+ bias): a linear layer over an int8
    weight packed by pack_weight_blocks, with one float32 scale per output channel (N =
    scale's length). x is [M, K] (float32; on CUDA also float16 or bfloat16); y [M, N] of x's
    dtype. This reference dequantizes the whole weight on every call; the CPU and GPU targets
    run kernels that read it as int8."""
    weight_float = unpack_weight_blocks(weight, scale.shape[0]).float() * scale[:, None]
    return F.linear(x, weight_float.to(x.dtype), bias)


@linear_int8_weight.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
      bias: torch.Tensor | None = None) -> torch.Tensor:
    torch._check(x.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: f"linear_int8_weight: x {tuple(x.shape)} against a packed weight "
                         f"{tuple(weight.shape)}")
    return x.new_empty(x.shape[0], scale.shape[0])


def pack_int4_weight(q: torch.Tensor) -> torch.Tensor:
    """[N, K] uint8 holding 0..15 -> [ceil(N / 64), K, 32] uint8: blocks of 64 output channels
    as for int8, two per byte: byte j of an input channel holds channel j in its low nibble
    and channel j + 32 in its high one (one 32-byte load widens to four float vectors)."""
    blocks = pack_weight_blocks(q.to(torch.int8)).to(torch.uint8)  # [NB, K, 64]
    return (blocks[..., :32] | (blocks[..., 32:] << 4)).contiguous()


def unpack_int4_weight(packed: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of pack_int4_weight: [N, K] uint8 holding 0..15."""
    full = torch.cat([packed & 15, packed >> 4], dim=-1)  # [NB, K, 64]
    return unpack_weight_blocks(full.to(torch.int8), n).to(torch.uint8)


@torch.library.custom_op("jitopt::linear_int4_weight", mutates_args=())
def linear_int4_weight(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor,
                       offset: torch.Tensor, n: int, group_size: int,
                       bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T (+ bias) where W[c, k] = q[c, k] * scale[c, g] + offset[c, g] for the group
    g = k // group_size: 4-bit codes q (0..15) packed by pack_int4_weight, a float32 scale
    and offset per output channel and group of input channels ([N, groups], packed by
    pack_weight_blocks like a weight). x is [M, K] (float32; on CUDA also float16 or
    bfloat16); y [M, n] of x's dtype. This reference dequantizes on every call."""
    k = weight.shape[1]

    def per_weight(params: torch.Tensor) -> torch.Tensor:  # [n, K]
        return unpack_weight_blocks(params, n).repeat_interleave(group_size, dim=1)[:, :k]

    q = unpack_int4_weight(weight, n).float()  # [n, K]
    return F.linear(x, (q * per_weight(scale) + per_weight(offset)).to(x.dtype), bias)


@linear_int4_weight.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor,
      n: int, group_size: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    torch._check(x.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: f"linear_int4_weight: x {tuple(x.shape)} against a packed weight "
                         f"{tuple(weight.shape)}")
    return x.new_empty(x.shape[0], n)


# A blocked-weight linear's activation (applied to y as it is stored) -> its reference.
LINEAR_ACTIVATIONS = {
    "none": lambda y: y, "relu": torch.relu, "gelu": F.gelu,
    "gelu_tanh": lambda y: F.gelu(y, approximate="tanh"), "silu": F.silu, "tanh": torch.tanh,
    "sigmoid": torch.sigmoid,
}


@torch.library.custom_op("jitopt::linear_blocked_weight", mutates_args=())
def linear_blocked_weight(x: torch.Tensor, weight: torch.Tensor, n: int,
                          bias: torch.Tensor | None = None,
                          activation: str = "none") -> torch.Tensor:
    """y = act(x @ W.T (+ bias)) with W packed by pack_weight_blocks and stored as float32,
    bfloat16 or float16, and everything else float32: x [M, K], the products and sums, y
    [M, n]; `act` one of LINEAR_ACTIVATIONS. This reference multiplies x into each block of
    64 output channels (one batched matmul: the weight is widened, never unpacked)."""
    blocks = torch.matmul(x, weight.to(x.dtype))  # [NB, M, 64]
    y = blocks.permute(1, 0, 2).reshape(x.shape[0], weight.shape[0] * weight.shape[2])[:, :n]
    return LINEAR_ACTIVATIONS[activation](y + bias if bias is not None else y).contiguous()


def blocked_linear_args(args: tuple) -> tuple:
    """A linear_blocked_weight call's positional args with defaults filled in: (x, weight,
    n, bias, activation)."""
    return (*args, *(None, "none")[len(args) - 3:])


@linear_blocked_weight.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, n: int, bias: torch.Tensor | None = None,
      activation: str = "none") -> torch.Tensor:
    torch._check(x.dim() == 2 and x.shape[1] == weight.shape[1],
                 lambda: f"linear_blocked_weight: x {tuple(x.shape)} against a packed weight "
                         f"{tuple(weight.shape)}")
    torch._check(activation in LINEAR_ACTIVATIONS,
                 lambda: f"linear_blocked_weight: activation {activation!r} is not one of "
                         f"{sorted(LINEAR_ACTIVATIONS)}")
    return x.new_empty(x.shape[0], n)


# Winograd F(2x2, 3x3) (Lavin and Gray, 2016): a 2x2 block of a 3x3 convolution's outputs
# from a 4x4 input tile in 16 products instead of 36. u = B^T d B, w = G g G^T, y = A^T m A.
WINOGRAD_BT = ((1, 0, -1, 0), (0, 1, 1, 0), (0, -1, 1, 0), (0, 1, 0, -1))
WINOGRAD_G = ((1, 0, 0), (0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0, 0, 1))
WINOGRAD_AT = ((1, 1, 1, 0), (0, 1, -1, -1))


def winograd_weight(weight: torch.Tensor) -> torch.Tensor:
    """[K, C, 3, 3] -> [16, C, K]: G g G^T for each output and input channel, point by point
    (p = 4 * row + column), computed in float64 and rounded once."""
    g = torch.tensor(WINOGRAD_G, dtype=torch.float64, device=weight.device)
    out_channels, in_channels = weight.shape[:2]
    transformed = torch.einsum("ai,kcij,bj->abck", g, weight.double(), g)
    return transformed.reshape(16, in_channels, out_channels).to(weight.dtype).contiguous()


@torch.library.custom_op("jitopt::conv3x3_winograd", mutates_args=())
def conv3x3_winograd(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                     other: torch.Tensor | None = None, unary: str = "none") -> torch.Tensor:
    """[relu](conv2d(x, g, bias, stride=1, padding=1) [+ other]) for a 3x3 kernel g given as
    weight = winograd_weight(g): x [N, C, H, W], out [N, K, H, W] channels-last. This
    reference runs the same transforms in ATen ops; the CPU target runs a kernel."""
    n, c, h, w = x.shape
    tiles_h, tiles_w = -(-h // 2), -(-w // 2)
    padded = F.pad(x, (1, 2 * tiles_w + 1 - w, 1, 2 * tiles_h + 1 - h))
    d = padded.unfold(2, 4, 2).unfold(3, 4, 2)  # [N, C, TH, TW, 4, 4]
    bt = torch.tensor(WINOGRAD_BT, dtype=x.dtype, device=x.device)
    u = torch.einsum("ai,ncyxij,bj->abnyxc", bt, d, bt).reshape(16, -1, c)
    m = torch.bmm(u, weight).view(4, 4, n, tiles_h, tiles_w, -1)
    at = torch.tensor(WINOGRAD_AT, dtype=x.dtype, device=x.device)
    y = torch.einsum("ai,ijnyxk,bj->nyaxbk", at, m, at)
    y = y.reshape(n, 2 * tiles_h, 2 * tiles_w, -1)[:, :h, :w].permute(0, 3, 1, 2)
    if bias is not None:
        y = y + bias[:, None, None]
    if other is not None:
        y = y + other
    if unary == "relu":
        y = torch.relu(y)
    return y.contiguous(memory_format=torch.channels_last)


@conv3x3_winograd.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
      other: torch.Tensor | None = None, unary: str = "none") -> torch.Tensor:
    torch._check(x.dim() == 4 and weight.shape[:2] == (16, x.shape[1]),
                 lambda: f"conv3x3_winograd: x {tuple(x.shape)} against a Winograd weight "
                         f"{tuple(weight.shape)}")
    n, _, h, w = x.shape
    return x.new_empty(n, weight.shape[2], h, w).contiguous(memory_format=torch.channels_last)


def kv_append(cache: torch.Tensor, new: torch.Tensor, dim: int,
              max_tokens: int | None = None) -> torch.Tensor:
    """`torch.cat([cache, new], dim)` for a key/value cache: the same values, returned as a
    view of a runtime-owned buffer with spare capacity, so a decode step writes only the new
    positions (see jitopt/runtime/kv_buffer.py). A plain function, not a torch op: its result
    may share storage with `cache` (never changing what `cache` shows), which no torch op may
    do."""
    from jitopt.runtime.kv_buffer import append

    return append(cache, new, dim, max_tokens)
