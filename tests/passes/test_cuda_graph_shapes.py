"""What the pipeline makes of CUDA graphs, checked here on CPU with fake CUDA tensors: matmuls
and convolutions stay the ATen calls that reach cuBLAS and cuDNN (the oneDNN rewrites are for
CPU only), hand-written attention becomes `scaled_dot_product_attention` (ATen picks a flash
kernel on the GPU), and the pointwise work around them is grouped for generated kernels."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx

from jitopt.passes import PIPELINE, run_passes
from jitopt.passes.group_fusions import GROUP_KEY

aten = torch.ops.aten


def _cuda_graph(fn, *shapes, dtype=torch.float32):
    """`fn` traced to ATen over fake CUDA tensors, then run through the whole pipeline."""
    with FakeTensorMode():
        args = [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]
        gm = make_fx(fn)(*args)
        run_passes(gm, PIPELINE)
    return gm


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def _attention(q, k, v, mask):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask
    return torch.softmax(scores, -1) @ v


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_attention_becomes_sdpa(dtype):
    gm = _cuda_graph(_attention, (2, 4, 16, 32), (2, 4, 16, 32), (2, 4, 16, 32), (2, 1, 1, 16),
                     dtype=dtype)
    targets = _targets(gm)
    assert targets.count(aten.scaled_dot_product_attention.default) == 1
    assert aten.bmm.default not in targets and aten._softmax.default not in targets
    assert aten._scaled_dot_product_flash_attention_for_cpu.default not in targets
    (sdpa,) = [n for n in gm.graph.nodes if n.target is aten.scaled_dot_product_attention.default]
    assert sdpa.kwargs["scale"] == pytest.approx(1 / math.sqrt(32))
    out = sdpa.meta["val"]
    assert out.device.type == "cuda" and out.dtype == dtype and tuple(out.shape) == (2, 4, 16, 32)


def test_linear_and_activation_stay_cublas_and_a_generated_kernel():
    def mlp(x, w, b):
        return F.gelu(F.linear(x, w, b)) * 2

    gm = _cuda_graph(mlp, (8, 32), (64, 32), (64,))
    targets = _targets(gm)
    assert aten.addmm.default in targets
    assert not any("mkldnn" in str(t) for t in targets)
    grouped = {n.target for n in gm.graph.nodes if GROUP_KEY in n.meta}
    assert {aten.gelu.default, aten.mul.Tensor} <= grouped


def test_convolution_stays_cudnn():
    def conv(x, w):
        return torch.relu(F.conv2d(x, w, padding=1))

    gm = _cuda_graph(conv, (2, 3, 16, 16), (8, 3, 3, 3))
    targets = _targets(gm)
    assert aten.convolution.default in targets
    assert not any("mkldnn" in str(t) for t in targets)
