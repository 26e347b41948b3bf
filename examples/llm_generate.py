"""Greedy generation with Hugging Face GPT-2, eager against jitopt (fp32, and a quantize= mode).

    python examples/llm_generate.py                               # 128 new tokens
    python examples/llm_generate.py --quantize int4-weight-only --tokens 256

The model is GPT-2's 124M architecture with random weights (no downloads here), so the text
is noise and a lower-precision mode may pick other tokens than fp32 (near-flat logits); the
speed is what a trained model of this size gets. jitopt's KV-cache rewrite (on by default)
appends each step's keys and values into buffers with spare capacity instead of copying the
cache every step; its quantize= modes shrink the weights that decoding reads once per token.
"""

from __future__ import annotations

import argparse
import time

import torch

import jitopt


def generate(model: torch.nn.Module, prompt: torch.Tensor, tokens: int) -> tuple[torch.Tensor,
                                                                               float]:
    """(generated ids, seconds per new token), after one short warm-up generation."""
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)
        jitopt.finish_compiles()
        start = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=tokens, min_new_tokens=tokens,
                             do_sample=False, pad_token_id=0)
    return out, (time.perf_counter() - start) / tokens


def main() -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--quantize", default="int8-weight-only",
                        help="a jitopt quantize= mode (see jitopt.Config), or 'none'")
    args = parser.parse_args()
    prompt = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(1))
    runs = {"eager": None, "jitopt": {}}
    if args.quantize != "none":
        runs[f"jitopt quantize={args.quantize}"] = {"quantize": args.quantize}
    eager_ids, eager_seconds = None, None
    for name, options in runs.items():
        torch.manual_seed(0)  # the same random weights for every run
        model = GPT2LMHeadModel(GPT2Config()).eval()
        if options is not None:
            model.forward = torch.compile(model.forward, backend="jitopt", options=options)
        ids, seconds = generate(model, prompt, args.tokens)
        if eager_ids is None:
            eager_ids, eager_seconds, note = ids, seconds, ""
        else:
            note = f", same tokens as eager: {torch.equal(ids, eager_ids)}"
        print(f"{name:40s} {1e3 * seconds:7.2f} ms/token  {1 / seconds:6.1f} tokens/s  "
              f"{eager_seconds / seconds:5.2f}x eager{note}")


if __name__ == "__main__":
    main()
