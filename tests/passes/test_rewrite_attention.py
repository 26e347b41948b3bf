"""Hand-written attention to the fused attention kernel, on the forms real models use."""

import math

import pytest
import torch
import torch.nn as nn
from comparisons import assert_same

import jitopt

SDPA = "_scaled_dot_product_flash_attention_for_cpu"


def _compile_and_compare(model, *inputs, atol=1e-5):
    with torch.no_grad():
        want = model(*inputs)
        got = torch.compile(model, backend="jitopt", options={"on_error": "raise"})(*inputs)
        rewrites = jitopt.counters["passes"]["rewrite_attention"]
        kernels = jitopt.counters["kernels"]["cpp_attention"]
        source = jitopt.explain(model, *inputs).graphs[0].aten[0].wrapper_source
    assert_same(got, want, atol=atol, rtol=1e-4)
    # The fused call runs as ATen's kernel in the wrapper, or as the CPU target's own.
    return rewrites, (source, kernels)


def _fused_calls(compiled) -> int:
    source, kernels = compiled
    return source.count(f"{SDPA}_default_(") + kernels


class HandWritten(nn.Module):
    """Attention as people write it: q @ k^T / sqrt(d), optional additive mask, softmax, @ v."""

    def __init__(self, masked: bool, return_scores: bool = False):
        super().__init__()
        self.qkv = nn.Linear(32, 96)
        self.masked, self.return_scores = masked, return_scores

    def forward(self, x):
        b, s, _ = x.shape
        q, k, v = (t.view(b, s, 4, 8).transpose(1, 2) for t in self.qkv(x).split(32, -1))
        scores = q @ k.transpose(-1, -2) / math.sqrt(8)
        if self.masked:
            causal = torch.ones(s, s, dtype=torch.bool).tril()
            scores = scores + torch.zeros(s, s).masked_fill(~causal, -1e9)
        probs = scores.softmax(-1)
        out = (probs @ v).transpose(1, 2).reshape(b, s, 32)
        return (out, scores) if self.return_scores else out


@pytest.mark.parametrize("masked", [False, True])
def test_hand_written_attention_is_rewritten(masked):
    rewrites, compiled = _compile_and_compare(HandWritten(masked).eval(), torch.randn(2, 6, 32))
    assert rewrites == 1 and _fused_calls(compiled) == 1 and "bmm" not in compiled[0]


def test_scores_used_elsewhere_are_left_alone():
    rewrites, (source, _) = _compile_and_compare(
        HandWritten(True, return_scores=True).eval(), torch.randn(2, 6, 32))
    assert rewrites == 0 and "bmm" in source


def _hf(name: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128,
                                         n_positions=64, attn_implementation="eager")
        model, inputs = transformers.GPT2LMHeadModel(config), (torch.randint(0, 128, (2, 9)),)
    elif name == "bert":
        config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, intermediate_size=128,
                                         vocab_size=128, attn_implementation="eager")
        mask = torch.ones(2, 9, dtype=torch.long)
        mask[1, 6:] = 0  # padding
        model, inputs = transformers.BertModel(config), (torch.randint(0, 128, (2, 9)), mask)
    else:
        config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2,
                                          intermediate_size=128, vocab_size=128,
                                          attn_implementation="eager")
        model, inputs = transformers.LlamaForCausalLM(config), (torch.randint(0, 128, (2, 9)),)
    model.config.use_cache = False
    return model.eval(), inputs


class FirstOutput(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *inputs):
        return self.model(*inputs)[0]


@pytest.mark.parametrize("name", ["gpt2", "bert", "llama"])
def test_hugging_face_eager_attention_is_rewritten(name):
    """GPT-2 (causal), BERT (padding mask) and Llama (causal, GQA: 4 query heads, 2 kv)."""
    model, inputs = _hf(name)
    rewrites, compiled = _compile_and_compare(FirstOutput(model), *inputs)
    assert rewrites == 2 and _fused_calls(compiled) == 2
