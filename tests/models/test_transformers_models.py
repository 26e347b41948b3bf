"""Hugging Face transformers models (tiny configs, random weights, nothing downloaded) compiled
with jitopt and compared with eager: forward outputs, and greedy generation token by token."""

from __future__ import annotations

import copy

import pytest
import torch
from comparisons import assert_same

import jitopt

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.slow

ATTENTION = ["eager", "sdpa"]
VOCAB = 256
# The tolerance assert_same allows on logits; a compiled-vs-eager difference of this size must
# not be able to change a greedy token (see assert_greedy_tokens_are_meaningful).
ATOL = 1e-5


def assert_compiled_something():
    assert jitopt.counters["graphs"]["captured"] >= 1
    assert jitopt.counters["graphs"]["compiled_inference"] >= 1
    assert sum(jitopt.counters["fallbacks"].values()) == 0


def cache_tensors(cache) -> list[torch.Tensor]:
    """The key and value tensors of a transformers Cache (DynamicCache in 5.x), layer by layer."""
    if cache is None:
        return []
    if hasattr(cache, "layers"):
        return [t for layer in cache.layers for t in (layer.keys, layer.values)]
    return [t for layer in cache for t in layer]  # legacy tuple-of-tuples


def assert_model_outputs_same(actual, expected) -> None:
    """Compare two ModelOutputs field by field; a Cache is compared through its tensors."""
    assert type(actual) is type(expected)
    assert list(actual.keys()) == list(expected.keys())
    for key in expected.keys():
        if isinstance(expected[key], transformers.Cache):  # "past_key_values", "cache" in 5.24
            assert_same(cache_tensors(actual[key]), cache_tensors(expected[key]))
        else:
            assert_same(actual[key], expected[key])


# --------------------------------------------------------------------------------------------
# GPT-2


def gpt2_config(attn: str, **overrides):
    cfg = dict(n_layer=2, n_embd=64, n_head=4, vocab_size=VOCAB, n_positions=128,
               bos_token_id=0, eos_token_id=None, pad_token_id=0,
               tie_word_embeddings=False, attn_implementation=attn)
    cfg.update(overrides)
    return transformers.GPT2Config(**cfg)


def make_gpt2(attn: str) -> "transformers.GPT2LMHeadModel":
    model = transformers.GPT2LMHeadModel(gpt2_config(attn)).eval()
    assert model.config._attn_implementation == attn
    # Random weights give near-flat logits (std ~0.2 with the default initializer_range 0.02),
    # where a rounding difference could flip a greedy pick. An untied lm_head drawn 50x larger
    # makes them peaked (std ~8); the generation tests still check the margins explicitly.
    with torch.no_grad():
        model.lm_head.weight.normal_(mean=0.0, std=1.0)
    return model


def gpt2_inputs(batch: int = 2, seq: int = 10):
    ids = torch.randint(1, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    return ids, mask


@pytest.mark.parametrize("attn", ATTENTION)
def test_gpt2_forward_logits(attn):
    model = make_gpt2(attn)
    ids, _ = gpt2_inputs()
    with torch.no_grad():
        expected = model(ids, use_cache=False)
        actual = torch.compile(model, backend="jitopt")(ids, use_cache=False)
    assert_model_outputs_same(actual, expected)
    assert actual.logits.shape == (2, 10, VOCAB)
    assert_compiled_something()
    # No attention mask passed: the causal one is built from sizes, and becomes the flag.
    assert jitopt.counters["passes"]["rewrite_causal_mask"] == model.config.n_layer


@pytest.mark.parametrize("attn", ATTENTION)
def test_gpt2_forward_hidden_states_and_cache(attn):
    model = make_gpt2(attn)
    ids, mask = gpt2_inputs()
    kwargs = dict(attention_mask=mask, use_cache=True, output_hidden_states=True)
    with torch.no_grad():
        expected = model(ids, **kwargs)
        actual = torch.compile(model, backend="jitopt")(ids, **kwargs)
    assert_model_outputs_same(actual, expected)
    assert len(actual.hidden_states) == model.config.n_layer + 1
    cache = next(v for v in actual.values() if isinstance(v, transformers.Cache))
    assert len(cache_tensors(cache)) == 2 * model.config.n_layer
    assert_compiled_something()


@pytest.mark.parametrize("attn", ATTENTION)
def test_gpt2_forward_left_padded_batch(attn):
    """A left-padded batch (what generate() sees for prompts of different lengths)."""
    model = make_gpt2(attn)
    ids, mask = gpt2_inputs()
    mask[0, :4] = 0
    ids[0, :4] = model.config.pad_token_id
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    kwargs = dict(attention_mask=mask, position_ids=position_ids, use_cache=False)
    with torch.no_grad():
        expected = model(ids, **kwargs)
        actual = torch.compile(model, backend="jitopt")(ids, **kwargs)
    # The logits at padded positions are not used by anyone; compare them all anyway, they
    # are deterministic functions of the inputs in both eager and compiled code.
    assert_model_outputs_same(actual, expected)
    assert_compiled_something()


def assert_greedy_tokens_are_meaningful(eager_out, compiled_out, prompt_len: int) -> None:
    """Equal token ids only prove something if no allowed numeric difference could have
    changed a pick: at every generated step eager's top-1 logit must beat its top-2 by far more
    than the compiled-vs-eager logit difference (and than the tolerance we would accept)."""
    eager_logits = torch.stack(eager_out.logits)  # (steps, batch, vocab), raw logits
    compiled_logits = torch.stack(compiled_out.logits)
    assert eager_logits.shape == compiled_logits.shape
    assert eager_logits.shape[0] == eager_out.sequences.shape[1] - prompt_len
    # The per-step logits themselves match eager.
    assert_same(compiled_logits, eager_logits)
    top2 = eager_logits.topk(2, dim=-1).values
    margin = (top2[..., 0] - top2[..., 1]).min().item()
    diff = (compiled_logits - eager_logits).abs().max().item()
    assert margin > 100 * max(diff, ATOL), (
        f"greedy margin {margin:.3g} is not comfortably above the compiled-vs-eager logit "
        f"difference {diff:.3g}: token equality would not be a meaningful check")
    # The tokens eager picked are the argmax of its logits (no processor changed them).
    picked = eager_out.sequences[:, prompt_len:].T
    assert torch.equal(picked, eager_logits.argmax(-1))


@pytest.mark.parametrize("attn", ATTENTION)
def test_gpt2_greedy_generate(attn):
    model = make_gpt2(attn)
    compiled_model = copy.deepcopy(model)
    compiled_model.forward = torch.compile(compiled_model.forward, backend="jitopt")
    ids, mask = gpt2_inputs(batch=2, seq=6)
    new_tokens = 8
    kwargs = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                  do_sample=False, num_beams=1, pad_token_id=model.config.pad_token_id,
                  return_dict_in_generate=True, output_logits=True)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        actual = compiled_model.generate(ids, **kwargs)
    assert expected.sequences.shape == (2, 6 + new_tokens)
    assert torch.equal(actual.sequences, expected.sequences)
    assert_greedy_tokens_are_meaningful(expected, actual, prompt_len=6)
    assert_compiled_something()
    # Prefill and decode steps both went through jitopt.
    assert jitopt.counters["graphs"]["compiled_inference"] >= 2


@pytest.mark.parametrize("attn", ATTENTION)
def test_gpt2_greedy_generate_left_padded(attn):
    model = make_gpt2(attn)
    compiled_model = copy.deepcopy(model)
    compiled_model.forward = torch.compile(compiled_model.forward, backend="jitopt")
    ids, mask = gpt2_inputs(batch=2, seq=7)
    mask[1, :3] = 0
    ids[1, :3] = model.config.pad_token_id
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, num_beams=1,
                  pad_token_id=model.config.pad_token_id, return_dict_in_generate=True,
                  output_logits=True)
    with torch.no_grad():
        expected = model.generate(ids, **kwargs)
        actual = compiled_model.generate(ids, **kwargs)
    assert torch.equal(actual.sequences, expected.sequences)
    assert_greedy_tokens_are_meaningful(expected, actual, prompt_len=7)
    assert_compiled_something()


# --------------------------------------------------------------------------------------------
# BERT


def bert_config(attn: str, **overrides):
    cfg = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
               intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
               pad_token_id=0, attn_implementation=attn)
    cfg.update(overrides)
    return transformers.BertConfig(**cfg)


def bert_inputs(batch: int = 3, seq: int = 12):
    ids = torch.randint(1, VOCAB, (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    ids[mask == 0] = 0
    token_type_ids = torch.zeros(batch, seq, dtype=torch.long)
    token_type_ids[:, seq // 2:] = 1
    return ids, mask, token_type_ids


@pytest.mark.parametrize("attn", ATTENTION)
def test_bert_model_hidden_states(attn):
    model = transformers.BertModel(bert_config(attn)).eval()
    assert model.config._attn_implementation == attn
    ids, mask, token_types = bert_inputs()
    kwargs = dict(attention_mask=mask, token_type_ids=token_types, output_hidden_states=True)
    with torch.no_grad():
        expected = model(ids, **kwargs)
        actual = torch.compile(model, backend="jitopt")(ids, **kwargs)
    assert_model_outputs_same(actual, expected)
    assert actual.last_hidden_state.shape == (3, 12, 64)
    assert actual.pooler_output.shape == (3, 64)
    assert_compiled_something()


def test_bert_model_attentions_eager():
    """output_attentions needs the eager attention (sdpa cannot return the weights)."""
    model = transformers.BertModel(bert_config("eager")).eval()
    ids, mask, token_types = bert_inputs()
    kwargs = dict(attention_mask=mask, token_type_ids=token_types, output_attentions=True)
    with torch.no_grad():
        expected = model(ids, **kwargs)
        actual = torch.compile(model, backend="jitopt")(ids, **kwargs)
    assert_model_outputs_same(actual, expected)
    assert len(actual.attentions) == 2 and actual.attentions[0].shape == (3, 4, 12, 12)
    assert_compiled_something()


@pytest.mark.parametrize("attn", ATTENTION)
def test_bert_masked_lm_logits(attn):
    model = transformers.BertForMaskedLM(bert_config(attn)).eval()
    ids, mask, token_types = bert_inputs()
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, token_type_ids=token_types)
        actual = torch.compile(model, backend="jitopt")(ids, attention_mask=mask,
                                                        token_type_ids=token_types)
    assert_model_outputs_same(actual, expected)
    assert actual.logits.shape == (3, 12, VOCAB)
    assert_compiled_something()


def test_bert_sequence_classification_for_inference():
    """jitopt.for_inference on a transformers model (frozen weights)."""
    model = transformers.BertForSequenceClassification(bert_config("eager", num_labels=3))
    model.train()  # for_inference must switch dropout off
    ids, mask, token_types = bert_inputs()
    served = jitopt.for_inference(model)
    actual = served(ids, attention_mask=mask, token_type_ids=token_types)
    with torch.no_grad():
        expected = model(ids, attention_mask=mask, token_type_ids=token_types)
    assert not model.training
    assert_model_outputs_same(actual, expected)
    assert actual.logits.shape == (3, 3)
    assert_compiled_something()
