"""Graph-to-graph rewrites over ATen FX graphs, run in the order of PIPELINE."""

from jitopt.passes.eliminate_common_subexpressions import eliminate_common_subexpressions
from jitopt.passes.eliminate_dead_code import eliminate_dead_code
from jitopt.passes.fold_constants import fold_constants
from jitopt.passes.fold_conv_bn import fold_conv_bn
from jitopt.passes.fold_linear_bn import fold_linear_bn
from jitopt.passes.fuse_conv_epilogues import fuse_conv_epilogues
from jitopt.passes.fuse_linear_epilogues import fuse_linear_epilogues
from jitopt.passes.group_fusions import group_fusions
from jitopt.passes.infra import PassRecord, run_passes
from jitopt.passes.pack_linear_weight_blocks import pack_linear_weight_blocks
from jitopt.passes.prepack_convolutions import prepack_convolutions
from jitopt.passes.prepack_linear_weights import prepack_linear_weights
from jitopt.passes.quantize_conv_int8_static import quantize_conv_int8_static
from jitopt.passes.quantize_embedding_int8 import quantize_embedding_int8
from jitopt.passes.quantize_linear_int8 import quantize_linear_int8
from jitopt.passes.quantize_linear_int4_weight_only import quantize_linear_int4_weight_only
from jitopt.passes.quantize_linear_int8_weight_only import quantize_linear_int8_weight_only
from jitopt.passes.remove_noops import remove_noops
from jitopt.passes.rewrite_attention import rewrite_attention
from jitopt.passes.rewrite_causal_mask import rewrite_causal_mask
from jitopt.passes.rewrite_conv_winograd import rewrite_conv_winograd
from jitopt.passes.rewrite_gelu_tanh import rewrite_gelu_tanh
from jitopt.passes.rewrite_kv_cache import rewrite_kv_cache
from jitopt.passes.sink_views_through_pointwise import sink_views_through_pointwise
from jitopt.passes.split_constant_bmm import split_constant_bmm
from jitopt.passes.store_linear_weights_half import (
    store_linear_weights_bf16, store_linear_weights_fp16)

PIPELINE = [
    # First: identities (dropout off, same-shape views, clones) hide the patterns below.
    remove_noops,
    # Turns weight transposes and other ops on frozen weights into constants, so the BN folds
    # see a constant weight and no call pays for them again.
    fold_constants,
    # BatchNorm after conv / linear becomes new constant weights (needs fold_constants first).
    fold_conv_bn,
    fold_linear_bn,
    # GPT-2's GELU written out becomes one op, which the linear epilogue below can take.
    rewrite_gelu_tanh,
    # With the int8 and int4 modes: a batched matmul over frozen weights to one matmul per
    # batch entry, which the linear quantize passes below then take.
    split_constant_bmm,
    # One of these, per the `quantize` option: linears over frozen weights to int8 products,
    # or to int8 / int4 / bfloat16 / float16 weights, or calibrated convolutions to uint8 x
    # int8 ones (after the BN folds, before packing, which would claim them in fp32).
    quantize_linear_int8,
    quantize_linear_int8_weight_only,
    quantize_linear_int4_weight_only,
    store_linear_weights_bf16,
    store_linear_weights_fp16,
    quantize_conv_int8_static,
    # With the int8 and int4 modes, embedding tables to int8 rows (after the linears: a table
    # tied to an output layer is quantized there from the fp32 copy this drops).
    quantize_embedding_int8,
    # Frozen linear weights of up to 128 rows to the CPU target's weight-streaming GEMM, the
    # rest onto oneDNN, each packed once (after the BN folds, which match addmm).
    pack_linear_weight_blocks,
    prepack_linear_weights,
    # Then activations right after such a linear become its post-op (before fusion claims them).
    fuse_linear_epilogues,
    # 3x3 stride-1 convolutions to Winograd F(2x2, 3x3) (after fold_conv_bn; before the
    # prepacking below would claim them), the rest to oneDNN with packed weights; outputs
    # become channels-last; then ReLU and residual adds become their post-ops.
    rewrite_conv_winograd,
    prepack_convolutions,
    fuse_conv_epilogues,
    # Attention written out by hand to the fused attention kernel (before fusion would claim
    # its softmax).
    rewrite_attention,
    # Then a mask that is torch's causal one, built from sizes (GPT-2's and Llama's prefill),
    # becomes the is_causal flag: the kernel skips the masked half instead of adding -inf.
    rewrite_causal_mask,
    # kv_cache=True only: a cache concatenated with a step's keys or values and returned
    # becomes an append into a buffer with spare capacity.
    rewrite_kv_cache,
    # Reshapes between a matmul and the next move past the elementwise ops there, so the
    # epilogue, activation and next input steps that no library call took share one shape,
    # and one kernel (after the rewrites above, whose patterns include those reshapes).
    sink_views_through_pointwise,
    # After the rewrites: they can expose duplicate ops on the same inputs.
    eliminate_common_subexpressions,
    # Last: sweeps what the rewrites left unused, and frees the constants they replaced.
    eliminate_dead_code,
    # After every rewrite: only tags which nodes share a generated kernel (the partitioner
    # reads the tags), so it sees the final graph.
    group_fusions,
]

# Passes that are only correct without autograd (a training graph keeps detach and clone
# semantics, and has no frozen weights to fold).
INFERENCE_ONLY = frozenset({remove_noops, fold_constants, fold_conv_bn, fold_linear_bn,
                            quantize_linear_int8, quantize_linear_int8_weight_only,
                            quantize_linear_int4_weight_only, store_linear_weights_bf16,
                            store_linear_weights_fp16, quantize_conv_int8_static,
                            quantize_embedding_int8, split_constant_bmm,
                            sink_views_through_pointwise, rewrite_causal_mask,
                            pack_linear_weight_blocks, prepack_linear_weights,
                            rewrite_kv_cache, fuse_linear_epilogues, rewrite_conv_winograd,
                            prepack_convolutions, fuse_conv_epilogues})

# Passes whose ops are fast only as the CPU target's hand-written kernels: they run only when
# the `targets` option has "cpp" (elsewhere the ops' ATen references would run, slower).
CPP_KERNEL_PASSES = frozenset({pack_linear_weight_blocks, rewrite_conv_winograd})

# Passes that run only when the `quantize` option names their mode.
QUANTIZE_PASSES = {"int8": (split_constant_bmm, quantize_linear_int8, quantize_embedding_int8),
                   "int8-weight-only": (split_constant_bmm, quantize_linear_int8_weight_only,
                                        quantize_embedding_int8),
                   "int4-weight-only": (split_constant_bmm, quantize_linear_int4_weight_only,
                                        quantize_embedding_int8),
                   "bf16": (store_linear_weights_bf16,),
                   "fp16": (store_linear_weights_fp16,),
                   "int8-static": (quantize_conv_int8_static,)}
QUANTIZING = frozenset(p for passes in QUANTIZE_PASSES.values() for p in passes)

__all__ = ["PIPELINE", "INFERENCE_ONLY", "CPP_KERNEL_PASSES", "QUANTIZE_PASSES", "QUANTIZING",
           "PassRecord", "run_passes"]
