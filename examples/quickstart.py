"""Compile a real model with jitopt, print what the compiler did and its speed against eager.

    python examples/quickstart.py              # GPT-2 (124M config, random weights), 1 x 128 tokens
    python examples/quickstart.py --model cnn  # a ResNet-18-like CNN, 8 x 3 x 224 x 224
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

import jitopt


def gpt2() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config())  # the 124M architecture; weights are random
    return model, (torch.randint(0, model.config.vocab_size, (1, 128)),)


def cnn() -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    def stage(cin: int, cout: int, stride: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

    model = nn.Sequential(
        nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
        nn.MaxPool2d(3, 2, 1), stage(64, 64, 1), stage(64, 128, 2), stage(128, 256, 2),
        stage(256, 512, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, 1000))
    return model, (torch.randn(8, 3, 224, 224),)


def median_seconds(fn, args, iterations: int) -> float:
    times = []
    for _ in range(iterations):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["gpt2", "cnn"], default="gpt2")
    parser.add_argument("--iterations", type=int, default=10)
    args = parser.parse_args()
    torch.manual_seed(0)
    model, inputs = {"gpt2": gpt2, "cnn": cnn}[args.model]()
    model.eval()

    start = time.perf_counter()
    served = jitopt.for_inference(model)
    with torch.inference_mode():
        got = served(*inputs)
        compile_seconds = time.perf_counter() - start
        want = model(*inputs)
        report = jitopt.explain(model, *inputs)
    got, want = (o.logits if hasattr(o, "logits") else o for o in (got, want))
    print(report)
    print(f"\nmax abs difference from eager: {(got - want).abs().max().item():.2e}")

    with torch.inference_mode():
        for fn in (model, served):  # warm up
            fn(*inputs)
        eager = median_seconds(model, inputs, args.iterations)
        fast = median_seconds(served, inputs, args.iterations)
    print(f"{args.model}: eager {eager * 1e3:.1f} ms, jitopt {fast * 1e3:.1f} ms "
          f"(median of {args.iterations}), speedup {eager / fast:.2f}x over eager; "
          f"first call with compile {compile_seconds:.1f} s")


if __name__ == "__main__":
    main()
