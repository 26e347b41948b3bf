"""Triton kernels for the quantized linears on the GPU target: `jitopt::linear_int8_weight` and
`jitopt::linear_int4_weight` (a float x times an int8 or 4-bit weight, read in its packed form
and widened in registers), and `aten._int_mm` (int8 x int8 into int32) where cuBLASLt refuses
it.

Why our own: PyTorch has no CUDA kernel for our packed weight-only formats (its
`_weight_int4pack_mm` wants another packing, bfloat16 only), and dequantizing the weight
first reads and writes several times the bytes the quantized weight has, which is the whole
cost of decoding. The packed layouts (jitopt/ops.py) suit a GPU tile as they suit the CPU
kernel: a block of 64 output channels stored input channel by input channel, so one program's
BLOCK_K x 64 tile of weight is one contiguous read. cuBLASLt's int8 GEMM needs more than 16
rows and sizes in multiples of 8: the int8 x int8 kernel takes the products it refuses
(decoding's few rows), so the int8 mode runs at every batch size.

Each kernel is a fixed template with the layer's sizes compiled in; triton.autotune picks the
tile per distinct row count. Under TRITON_INTERPRET=1 they run on CPU tensors, which is how
the tests check them against the ops' ATen references. Only tl builtins (tl.full, not
tl.zeros): the interpreter cannot run triton.language's own @jit helpers when triton was
imported before it was switched on.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

import jitopt.ops  # noqa: F401  (registers torch.ops.jitopt)
from jitopt.codegen.cpp_quantized_linear import operand_value
from jitopt.errors import Declined
from jitopt.ops import WEIGHT_BLOCK

LINEAR_INT8_WEIGHT = torch.ops.jitopt.linear_int8_weight.default
LINEAR_INT4_WEIGHT = torch.ops.jitopt.linear_int4_weight.default
INT_MM = torch.ops.aten._int_mm.default
OPS = (LINEAR_INT8_WEIGHT, LINEAR_INT4_WEIGHT, INT_MM)
FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TL_TYPES = {torch.float32: "tl.float32", torch.float16: "tl.float16",
            torch.bfloat16: "tl.bfloat16"}
# Tiles tried per distinct row count on a GPU (rows x input channels; the weight-only kernels
# are 64 output channels wide, the packing's block). The interpreter gets the first only.
WEIGHT_ONLY_TILES = ({"BLOCK_M": 16, "BLOCK_K": 64}, {"BLOCK_M": 16, "BLOCK_K": 128},
                     {"BLOCK_M": 32, "BLOCK_K": 64}, {"BLOCK_M": 64, "BLOCK_K": 64})
INT8_TILES = ({"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64},
              {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 128},
              {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 64},
              {"BLOCK_M": 128, "BLOCK_N": 128, "BLOCK_K": 64})


@dataclasses.dataclass(frozen=True)
class TritonLinearSpec:
    """What a kernel compiles in: its kind ("int8" or "int4" weight-only, "int8xint8" for
    _int_mm), input and output channels, a bias or not, x's dtype, and for int4 the group
    size."""

    kind: str
    k: int
    n: int
    x_dtype: torch.dtype
    bias: bool = False
    group_size: int = 0


def triton_linear_spec(node: fx.Node) -> TritonLinearSpec:
    """The spec of a quantized linear node a kernel here runs, or Declined."""
    if node.target is INT_MM:
        return _int_mm_spec(node)
    if node.target is LINEAR_INT8_WEIGHT:
        x, weight, scale, bias = (list(node.args) + [None])[:4]
        kind, group_size, width, dtype = "int8", 0, 64, torch.int8
        n = operand_value(scale).shape[0]
    elif node.target is LINEAR_INT4_WEIGHT:
        x, weight, _, _, n, group_size, bias = (list(node.args) + [None])[:7]
        kind, width, dtype = "int4", 32, torch.uint8
        if group_size % 16:  # a K tile divides a group, and tl.dot wants K tiles of 16 or more
            raise Declined(f"int4 Triton kernel: group size {group_size} is not a multiple of 16")
    else:
        raise Declined(f"not a quantized linear: {node.target}")
    xv, wv = operand_value(x), operand_value(weight)
    if xv.dim() != 2 or xv.dtype not in FLOATS or not isinstance(xv.shape[1], int):
        raise Declined("quantized-weight Triton kernel: a float [M, K] x with static K")
    k, blocks = int(xv.shape[1]), -(-int(n) // WEIGHT_BLOCK)
    if tuple(wv.shape) != (blocks, k, width) or wv.dtype != dtype:
        raise Declined(f"quantized-weight Triton kernel: weight {tuple(wv.shape)} {wv.dtype} "
                       f"is not packed for {n} output channels")
    return TritonLinearSpec(kind, k, int(n), xv.dtype, bias is not None, int(group_size))


def _int_mm_spec(node: fx.Node) -> TritonLinearSpec:
    a, b = (operand_value(arg) for arg in node.args)
    if not all(isinstance(s, int) for s in (a.shape[1], b.shape[1])):
        raise Declined("int8 Triton kernel: static K and N only")
    m, k, n = a.shape[0], int(a.shape[1]), int(b.shape[1])
    if a.device.type == "cuda" and isinstance(m, int) and m > 16 and k % 8 == 0 == n % 8:
        raise Declined("int8 x int8 with more than 16 rows: cuBLASLt runs it")
    return TritonLinearSpec("int8xint8", k, n, torch.int8)


def triton_linear_node(gm: fx.GraphModule) -> fx.Node | None:
    """The quantized linear of a partition triton_linear_groups proposed, else None."""
    return next((n for n in gm.graph.nodes if n.target in OPS), None)


def triton_linear_groups(gm: fx.GraphModule, device: str) -> list[list[fx.Node]]:
    """Each quantized linear on `device` a kernel here runs, alone in its group."""
    groups = []
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target not in OPS:
            continue
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.device.type != device:
            continue
        try:
            triton_linear_spec(node)
        except Declined:
            continue
        groups.append([node])
    return groups


def tiles(spec: TritonLinearSpec, interpret: bool) -> tuple[dict[str, int], ...]:
    """The autotuner's tiles for a kernel (one under the interpreter, which cannot time)."""
    if spec.kind == "int8xint8":
        options = INT8_TILES
    else:
        widest = spec.group_size or 128  # an int4 K tile stays inside one group
        options = tuple(t for t in WEIGHT_ONLY_TILES if widest % t["BLOCK_K"] == 0)
        options = options or ({"BLOCK_M": 16, "BLOCK_K": 16},)
    return options[:1] if interpret else options


def render_triton_linear(spec: TritonLinearSpec, name: str,
                         configs: tuple[dict[str, int], ...]) -> str:
    """The kernel's source under its autotune decorator."""
    body = {"int8": _int8_weight_body, "int4": _int4_weight_body,
            "int8xint8": _int8xint8_body}[spec.kind](spec)
    listed = "".join(f"        triton.Config({c!r}, num_warps=4),\n" for c in configs)
    return (f"@triton.autotune(\n    configs=[\n{listed}    ],\n    key=['M'],\n)\n"
            f"@triton.jit\ndef {name}(" + body)


def _dot(spec: TritonLinearSpec, w: str) -> str:
    """x @ w with w widened to x's dtype; float32 in IEEE arithmetic (tl.dot's default would
    be TF32, which eager PyTorch does not use for float32 matmuls unless asked)."""
    precision = ', input_precision="ieee"' if spec.x_dtype == torch.float32 else ""
    return f"tl.dot(x, {w}.to({TL_TYPES[spec.x_dtype]}){precision})"


def _x_tile(spec: TritonLinearSpec) -> list[str]:
    return [f"        ks = k0 + tl.arange(0, BLOCK_K)",
            f"        x = tl.load(x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,",
            f"                    mask=(rows[:, None] < M) & (ks[None, :] < {spec.k}), other=0.0)"]


def _epilogue(spec: TritonLinearSpec, acc: str, cols: str) -> list[str]:
    lines = [f"    y = {acc}"]
    if spec.bias:
        lines.append(f"    y += tl.load(bias_ptr + {cols}, mask={cols} < {spec.n}, "
                     "other=0.0).to(tl.float32)[None, :]")
    return lines + [f"    tl.store(y_ptr + rows[:, None] * {spec.n} + {cols}[None, :], "
                    f"y.to({TL_TYPES[spec.x_dtype]}),",
                    f"             mask=(rows[:, None] < M) & ({cols}[None, :] < {spec.n}))"]


def _int8_weight_body(spec: TritonLinearSpec) -> str:
    bias = "bias_ptr, " if spec.bias else ""
    lines = [f"x_ptr, w_ptr, scale_ptr, {bias}y_ptr, M, stride_xm, stride_xk,",
             "        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):",
             f"    # y[M, {spec.n}] = x[M, {spec.k}] @ (w * scale[:, None]).T"
             + (" + bias" if spec.bias else "") + ": w int8 [N / 64, K, 64]",
             "    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)",
             "    lanes = tl.arange(0, 64)",
             "    cols = tl.program_id(1) * 64 + lanes",
             f"    block = w_ptr + tl.program_id(1) * {spec.k * 64}",
             "    acc = tl.full((BLOCK_M, 64), 0.0, tl.float32)",
             f"    for k0 in range(0, {spec.k}, BLOCK_K):",
             *_x_tile(spec),
             "        w = tl.load(block + ks[:, None] * 64 + lanes[None, :],",
             f"                    mask=ks[:, None] < {spec.k}, other=0)",
             f"        acc += {_dot(spec, 'w')}",
             f"    scale = tl.load(scale_ptr + cols, mask=cols < {spec.n}, other=0.0)",
             *_epilogue(spec, "acc * scale[None, :]", "cols")]
    return "\n".join(lines) + "\n"


def _int4_weight_body(spec: TritonLinearSpec) -> str:
    """Byte j of a block's input channel holds output channel j (low nibble) and j + 32 (high):
    two 32-wide accumulators, each tile mapped through its group's scale and offset."""
    bias = "bias_ptr, " if spec.bias else ""
    groups = -(-spec.k // spec.group_size)
    lines = [f"x_ptr, w_ptr, scale_ptr, offset_ptr, {bias}y_ptr, M, stride_xm, stride_xk,",
             "        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):",
             f"    # y[M, {spec.n}] = x[M, {spec.k}] @ (q * scale + offset).T"
             + (" + bias" if spec.bias else "")
             + f" per group of {spec.group_size}: q 4-bit [N / 64, K, 32]",
             "    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)",
             "    lanes = tl.arange(0, 32)",
             "    low_cols = tl.program_id(1) * 64 + lanes",
             "    high_cols = low_cols + 32",
             f"    block = w_ptr + tl.program_id(1) * {spec.k * 32}",
             f"    params = tl.program_id(1) * {groups * 64}",
             "    acc_low = tl.full((BLOCK_M, 32), 0.0, tl.float32)",
             "    acc_high = tl.full((BLOCK_M, 32), 0.0, tl.float32)",
             f"    for k0 in range(0, {spec.k}, BLOCK_K):",
             *_x_tile(spec),
             "        packed = tl.load(block + ks[:, None] * 32 + lanes[None, :],",
             f"                         mask=ks[:, None] < {spec.k}, other=0)",
             f"        group = params + (k0 // {spec.group_size}) * 64 + lanes",
             "        low = ((packed & 15).to(tl.float32) * tl.load(scale_ptr + group)[None, :]",
             "               + tl.load(offset_ptr + group)[None, :])",
             "        high = ((packed >> 4).to(tl.float32) * tl.load(scale_ptr + group + 32)"
             "[None, :]",
             "                + tl.load(offset_ptr + group + 32)[None, :])",
             f"        acc_low += {_dot(spec, 'low')}",
             f"        acc_high += {_dot(spec, 'high')}",
             *_epilogue(spec, "acc_low", "low_cols"),
             *_epilogue(spec, "acc_high", "high_cols")]
    return "\n".join(lines) + "\n"


def _int8xint8_body(spec: TritonLinearSpec) -> str:
    lines = ["a_ptr, b_ptr, c_ptr, M, stride_am, stride_ak, stride_bk, stride_bn,",
             "        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):",
             f"    # c[M, {spec.n}] = a[M, {spec.k}] @ b[{spec.k}, {spec.n}], int8 into int32",
             "    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)",
             "    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)",
             "    acc = tl.full((BLOCK_M, BLOCK_N), 0, tl.int32)",
             f"    for k0 in range(0, {spec.k}, BLOCK_K):",
             "        ks = k0 + tl.arange(0, BLOCK_K)",
             "        a = tl.load(a_ptr + rows[:, None] * stride_am + ks[None, :] * stride_ak,",
             f"                    mask=(rows[:, None] < M) & (ks[None, :] < {spec.k}), other=0)",
             "        b = tl.load(b_ptr + ks[:, None] * stride_bk + cols[None, :] * stride_bn,",
             f"                    mask=(ks[:, None] < {spec.k}) & (cols[None, :] < {spec.n}),"
             " other=0)",
             "        acc += tl.dot(a, b, out_dtype=tl.int32)",
             f"    tl.store(c_ptr + rows[:, None] * {spec.n} + cols[None, :], acc,",
             f"             mask=(rows[:, None] < M) & (cols[None, :] < {spec.n}))"]
    return "\n".join(lines) + "\n"


def render_triton_linear_launcher(name: str, spec: TritonLinearSpec, gm: fx.GraphModule,
                                  device_type: str) -> str:
    """Python that allocates y [M, N] on the group's device and launches the kernel over row
    tiles x column blocks (the packed weights and their scales are contiguous constants)."""
    from jitopt.codegen.fusion_target import tensor_params

    node = triton_linear_node(gm)
    params, _ = tensor_params(gm)
    operands = [a.name for a in node.args if isinstance(a, fx.Node)]
    x = operands[0]
    out_dtype = "torch.int32" if spec.kind == "int8xint8" else f"{x}.dtype"
    if spec.kind == "int8xint8":
        b = operands[1]
        strides = [f"{x}.stride(0)", f"{x}.stride(1)", f"{b}.stride(0)", f"{b}.stride(1)"]
        columns = f'triton.cdiv({spec.n}, meta["BLOCK_N"])'
    else:
        strides = [f"{x}.stride(0)", f"{x}.stride(1)"]
        columns = str(-(-spec.n // WEIGHT_BLOCK))
    call = (f'kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), {columns})]'
            f"({', '.join(operands + ['y', 'm'] + strides)})")
    lines = [f"def {name}({', '.join(params)}):",
             f"    m = {x}.shape[0]",
             f"    y = torch.empty((m, {spec.n}), dtype={out_dtype}, device=device)",
             "    if m > 0:"]
    if device_type == "cuda":
        lines += ["        with torch.cuda.device(device):", f"            {call}"]
    else:
        lines.append(f"        {call}")
    return "\n".join(lines + ["    return y"]) + "\n"
