"""Whole models on a CUDA device, compiled with jitopt's defaults and compared with eager:
pointwise work in generated Triton kernels, matmuls and convolutions left to cuBLAS/cuDNN,
hand-written attention rewritten to SDPA, the KV cache appended in place. Skipped where there
is no GPU (tests/passes/test_cuda_graph_shapes.py checks the graphs' shape on CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import jitopt

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (this build or machine has none)")]



@pytest.fixture(autouse=True)
def compiled_for_the_gpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # real kernels, not the interpreter
    # Eager's fp32 matmuls must not use TF32 either, or the comparison measures TF32 rounding.
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def compile_and_compare(model: nn.Module, *inputs: torch.Tensor, dtype: torch.dtype) -> None:
    """float32: jitopt matches eager closely. float16: eager rounds after every op and jitopt's
    kernels once at the end, so the two differ by a few half-precision steps; there jitopt
    must be at least about as close to the float32 answer as eager is."""
    compiled = torch.compile(copy.deepcopy(model), backend="jitopt")
    with torch.no_grad():
        expected, actual = _first(model(*inputs)), _first(compiled(*inputs))
    assert actual.device.type == "cuda" and actual.dtype == expected.dtype
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)
    else:
        with torch.no_grad():
            exact = _first(copy.deepcopy(model).float()(
                *(x.float() if x.is_floating_point() else x for x in inputs))).float()
        eager_error = (expected.float() - exact).abs().max().item()
        assert (actual.float() - exact).abs().max().item() <= 1.5 * eager_error + 1e-3
    assert jitopt.counters["graphs"]["compiled_inference"] >= 1
    assert sum(jitopt.counters["fallbacks"].values()) == 0


def _first(output):
    return output[0] if hasattr(output, "keys") else output  # a transformers ModelOutput


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_mlp(dtype):
    model = nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.LayerNorm(64))
    model = model.eval().to("cuda", dtype)
    compile_and_compare(model, torch.randn(32, 64, device="cuda", dtype=dtype), dtype=dtype)
    assert jitopt.counters["targets"]["triton_partitions"] >= 1


@pytest.mark.parametrize("mode", ["int8", "int8-weight-only", "int4-weight-only"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("rows", [4, 48])
def test_quantized_mlp(mode, dtype, rows):
    """The quantize modes on CUDA: Triton kernels read the int8 or 4-bit weights (and take
    int8 x int8 products of 16 rows or fewer, which cuBLASLt refuses)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 128)).eval()
    x = torch.randn(rows, 256)
    with torch.no_grad():
        fp32 = model(x)
    model, x = model.to("cuda", dtype), x.to("cuda", dtype)
    compiled = torch.compile(model, backend="jitopt", options={"quantize": mode})
    with torch.no_grad():
        got = compiled(x)
    assert got.device.type == "cuda" and got.dtype == dtype
    cosine = torch.nn.functional.cosine_similarity(got.float().cpu().flatten(),
                                                   fp32.flatten(), 0)
    assert cosine > (0.99 if mode == "int4-weight-only" else 0.999)
    triton_products = mode != "int8" or rows <= 16
    assert (jitopt.counters["kernels"]["triton_quantized_linear"] >= 1) is triton_products
    assert sum(jitopt.counters["fallbacks"].values()) == 0


def test_cnn_with_batchnorm():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    with torch.no_grad():  # non-trivial running statistics, so folding them is checked
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
    model = model.eval().cuda()
    compile_and_compare(model, torch.randn(4, 3, 32, 32, device="cuda"), dtype=torch.float32)
    assert jitopt.counters["passes"]["fold_conv_bn"] == 2


def _gpt2(dtype: torch.dtype):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256,
                                     n_positions=128, attn_implementation="eager",
                                     tie_word_embeddings=False, pad_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():  # peaked logits, so greedy picks are not decided by rounding
        model.lm_head.weight.normal_(0.0, 1.0)
    return model.to("cuda", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gpt2_forward_attention_becomes_sdpa(dtype):
    model = _gpt2(dtype)
    model.config.use_cache = False
    compile_and_compare(model, torch.randint(1, 256, (2, 24), device="cuda"), dtype=dtype)
    assert jitopt.counters["passes"]["rewrite_attention"] == 2


def test_bert_forward_with_padding_mask():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=128, vocab_size=256,
                                     attn_implementation="eager")
    model = transformers.BertModel(config).eval().cuda()
    ids = torch.randint(1, 256, (3, 20), device="cuda")
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    compile_and_compare(model, ids, mask, dtype=torch.float32)
    assert jitopt.counters["passes"]["rewrite_attention"] == 2


def test_gpt2_greedy_generate_with_kv_cache_rewrite():
    from jitopt.runtime import kv_buffer

    model = _gpt2(torch.float32)
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="jitopt")
    ids = torch.randint(1, 256, (2, 6), device="cuda")
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=16, min_new_tokens=16,
                  do_sample=False, num_beams=1, pad_token_id=0)
    before = kv_buffer.counters["appended_in_place"]
    with torch.no_grad():
        expected, actual = model.generate(ids, **kwargs), compiled.generate(ids, **kwargs)
    assert torch.equal(actual, expected)
    assert jitopt.counters["passes"]["rewrite_kv_cache"] > 0
    assert kv_buffer.counters["appended_in_place"] > before
    assert sum(jitopt.counters["fallbacks"].values()) == 0


def test_replays_from_a_cuda_graph_and_returns_fresh_tensors():
    from jitopt.runtime import cuda_graph

    model = nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 64)).eval().cuda()
    compiled = torch.compile(model, backend="jitopt")
    before = dict(cuda_graph.counters)
    inputs = [torch.randn(16, 64, device="cuda") for _ in range(5)]
    with torch.no_grad():
        outputs = [compiled(x) for x in inputs]
        for x, out in zip(inputs, outputs):  # earlier results were not overwritten by replays
            torch.testing.assert_close(out, model(x), atol=1e-4, rtol=1e-4)
        assert compiled(inputs[0]).data_ptr() != compiled(inputs[0]).data_ptr()
    assert cuda_graph.counters["captured"] == before["captured"] + 1
    assert cuda_graph.counters["replayed"] >= before["replayed"] + 3
    with torch.no_grad():  # fresh inputs, freed each time: the allocator recycles addresses
        for _ in range(4):
            x = torch.randn(16, 64, device="cuda")
            torch.testing.assert_close(compiled(x), model(x), atol=1e-4, rtol=1e-4)
            del x


def test_a_graph_returning_a_view_of_its_input_is_not_captured():
    from jitopt.runtime import cuda_graph

    def fn(x):
        return x.view(-1), torch.relu(x) * 2

    compiled = torch.compile(fn, backend="jitopt")
    before = cuda_graph.counters["declined"]
    x = torch.randn(8, 8, device="cuda")
    with pytest.warns(UserWarning, match="without a CUDA graph"):
        for _ in range(4):
            view, out = compiled(x)
    assert view.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out, torch.relu(x) * 2)
    assert cuda_graph.counters["declined"] == before + 1


def test_cuda_graphs_can_be_turned_off():
    from jitopt.runtime import cuda_graph

    model = nn.Linear(32, 32).eval().cuda()
    compiled = torch.compile(model, backend="jitopt", options={"cuda_graphs": False})
    before = cuda_graph.counters["captured"]
    with torch.no_grad():
        for _ in range(4):
            compiled(torch.randn(4, 32, device="cuda"))
    assert cuda_graph.counters["captured"] == before
