"""kv_cache=True: caches grown by torch.cat each decode step become appends into buffers with
spare capacity; generations match eager token for token, forks stay apart, and decoding does
not recompile per step."""

import pytest
import torch

import jitopt
from jitopt.runtime import kv_buffer

transformers = pytest.importorskip("transformers")


def _peaked(model):
    """Random weights give near-flat logits, where float rounding flips greedy tokens; scaled
    embeddings (tied to the LM head) make each step's top token clear."""
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(8)
    return model.eval()


def _gpt2():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128,
                                     n_positions=512, bos_token_id=0, eos_token_id=0)
    return _peaked(transformers.GPT2LMHeadModel(config))


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=128,
                                      max_position_embeddings=512, bos_token_id=0,
                                      eos_token_id=0, tie_word_embeddings=True)
    return _peaked(transformers.LlamaForCausalLM(config))


def _greedy(model, prompt, tokens):
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=tokens, do_sample=False, pad_token_id=0)


@pytest.mark.slow
@pytest.mark.parametrize("build", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_generate_matches_eager_and_appends_in_place(build):
    model, prompt = build(), torch.randint(1, 128, (1, 7))
    want = _greedy(model, prompt, 120)
    before = dict(kv_buffer.counters)
    model.forward = torch.compile(model.forward, backend="jitopt")
    assert torch.equal(_greedy(model, prompt, 120), want)
    assert jitopt.counters["passes"]["rewrite_kv_cache"] > 0
    in_place = kv_buffer.counters["appended_in_place"] - before["appended_in_place"]
    copied = kv_buffer.counters["copied"] - before["copied"]
    assert in_place >= 110 * 4  # two layers x keys and values, nearly every step
    assert copied <= 3 * 4  # the first step, and growing to 128 and 256 positions
    # Prefill, the first decode step, one with the length symbolic, and one more at the third
    # step, where the cache moves from its exact-size buffer to a growable one and Dynamo
    # makes its strides symbolic: growing to 128 and 256 positions then recompiles nothing.
    assert jitopt.counters["graphs"]["compiled_inference"] == 4


@pytest.mark.slow
def test_prompts_of_other_lengths_do_not_recompile():
    model = _gpt2()
    prompts = [torch.randint(1, 128, (1, length)) for length in (5, 9, 17)]
    want = [_greedy(model, p, 24) for p in prompts]
    model.forward = torch.compile(model.forward, backend="jitopt")
    for prompt, expected in zip(prompts, want):
        assert torch.equal(_greedy(model, prompt, 24), expected)
    # The first prompt's four graphs (above), then a prefill with the length symbolic (as
    # with cat).
    assert jitopt.counters["graphs"]["compiled_inference"] <= 5


@pytest.mark.slow
def test_a_padded_batch_matches_eager():
    model = _gpt2()
    prompts = [[5, 17, 3, 99, 42, 7], [64, 12]]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])  # left padding
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])

    def greedy():
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, max_new_tokens=30,
                                  do_sample=False, pad_token_id=0)

    want = greedy()
    model.forward = torch.compile(model.forward, backend="jitopt")
    assert torch.equal(greedy(), want)
    assert jitopt.counters["passes"]["rewrite_kv_cache"] > 0


def test_a_hand_written_loop_and_a_fork_match_cat():
    torch.manual_seed(0)
    heads, dim = 2, 8

    def step(q, k_new, v_new, k_cache, v_cache):
        k = torch.cat([k_cache, k_new], dim=-2)  # [B, H, S + 1, D]
        v = torch.cat([v_cache, v_new], dim=-2)
        attn = torch.softmax(q @ k.transpose(-1, -2) / dim ** 0.5, dim=-1)
        return attn @ v, k, v

    compiled = torch.compile(step, backend="jitopt")
    k0, v0 = torch.randn(1, heads, 3, dim), torch.randn(1, heads, 3, dim)
    inputs = [tuple(torch.randn(1, heads, 1, dim) for _ in range(3)) for _ in range(20)]

    def run(fn, k, v, steps):
        outs = []
        for q, kn, vn in steps:
            o, k, v = fn(q, kn, vn, k, v)
            outs.append(o)
        return outs, k, v

    with torch.no_grad():
        want, k_want, v_want = run(step, k0, v0, inputs)
        got, k_got, v_got = run(compiled, k0, v0, inputs)
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w)
        assert torch.equal(k_got, k_want) and torch.equal(v_got, v_want)
        # Two continuations forked from one prefix: each must see only its own tokens.
        _, k_mid, v_mid = run(compiled, k0, v0, inputs[:10])
        branch_a = run(compiled, k_mid, v_mid, inputs[10:15])
        branch_b = run(compiled, k_mid, v_mid, inputs[15:20])
        _, k_ref, v_ref = run(step, k0, v0, inputs[:10])
        for branch, steps in ((branch_a, inputs[10:15]), (branch_b, inputs[15:20])):
            ref = run(step, k_ref, v_ref, steps)
            for g, w in zip(branch[0], ref[0]):
                torch.testing.assert_close(g, w)
            assert torch.equal(branch[1], ref[1]) and torch.equal(branch[2], ref[2])
    assert jitopt.counters["passes"]["rewrite_kv_cache"] > 0


def test_off_leaves_cat():
    def step(k_cache, k_new):
        return torch.cat([k_cache, k_new], dim=-2)

    out = torch.compile(step, backend="jitopt", options={"kv_cache": False})(
        torch.randn(1, 2, 3, 4), torch.randn(1, 2, 1, 4))
    assert out._base is None
    assert jitopt.counters["passes"]["rewrite_kv_cache"] == 0
