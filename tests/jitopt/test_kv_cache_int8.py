"""jitopt.Int8KVCache: keys and values held in int8 with a scale per token, compiled with the
KV-cache rewrite, against the same cache in eager and against fp32."""

import copy

import pytest
import torch

import jitopt
from jitopt.kv_cache_int8 import quantize_per_token
from jitopt.runtime import kv_buffer

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def test_rounding_is_within_half_a_step_per_token():
    states = torch.randn(2, 3, 5, 16) * torch.rand(2, 3, 5, 1) * 10
    values, scales = quantize_per_token(states)
    assert values.dtype == torch.int8 and scales.shape == (2, 3, 5, 1)
    assert ((values.float() * scales - states).abs() <= scales / 2 + 1e-6).all()


def _model(kind):
    if kind == "gpt2":
        config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=256,
                                         n_positions=256, tie_word_embeddings=False,
                                         pad_token_id=0)
        model = transformers.GPT2LMHeadModel(config).eval()
        head = model.lm_head
    else:  # Llama with grouped-query attention: the cache holds 2 KV heads for 4 queries
        config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=256,
                                          max_position_embeddings=256, pad_token_id=0,
                                          tie_word_embeddings=False)
        model = transformers.LlamaForCausalLM(config).eval()
        head = model.lm_head
    with torch.no_grad():  # peaked logits: a greedy pick is not decided by rounding
        head.weight.normal_(0.0, 1.0)
    return model


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_compiled_generation_matches_eager_with_the_same_cache(kind):
    torch.manual_seed(0)
    model = _model(kind)
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="jitopt")
    ids = torch.randint(1, 256, (2, 6))
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=24, min_new_tokens=24,
                  do_sample=False, pad_token_id=0)
    before = dict(kv_buffer.counters)
    eager_cache, compiled_cache = (jitopt.Int8KVCache(model.config) for _ in range(2))
    with torch.no_grad():
        fp32 = model.generate(ids, **kwargs)
        eager = model.generate(ids, past_key_values=eager_cache, **kwargs)
        got = compiled.generate(ids, past_key_values=compiled_cache, **kwargs)
    assert torch.equal(got, eager)
    assert (got == fp32).float().mean() > 0.9  # int8 keys and values barely move the picks
    assert jitopt.counters["passes"]["rewrite_kv_cache"] > 0
    assert kv_buffer.counters["appended_in_place"] > before["appended_in_place"]
    assert sum(jitopt.counters["fallbacks"].values()) == 0
    keys, scales = compiled_cache.layers[0]._quantized_keys
    assert keys.dtype == torch.int8 and keys.shape[-2] == 6 + 24 - 1
    assert scales.dtype == torch.float32 and scales.shape[-1] == 1


def test_beam_search_reorders_the_int8_rows():
    torch.manual_seed(0)
    model = _model("gpt2")
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="jitopt")
    ids = torch.randint(1, 256, (1, 5))
    kwargs = dict(max_new_tokens=10, num_beams=3, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        eager = model.generate(ids, past_key_values=jitopt.Int8KVCache(model.config), **kwargs)
        got = compiled.generate(ids, past_key_values=jitopt.Int8KVCache(model.config),
                                **kwargs)
    assert torch.equal(got, eager)
