"""The benchmark models. Each builds an eval-mode module whose forward takes positional tensors
and returns one tensor, so every engine (exported or compiled) sees the same function."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
import torch.nn as nn


@dataclasses.dataclass
class BenchModel:
    module: nn.Module
    inputs: tuple[torch.Tensor, ...]
    kind: str = "forward"  # "forward": time one call; "generate": tokens/s of greedy decoding
    new_tokens: int = 0


class LogitsOnly(nn.Module):
    """Hugging Face models return ModelOutput objects; engines want one tensor."""

    def __init__(self, model: nn.Module, field: str) -> None:
        super().__init__()
        self.model, self.field = model, field

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model(*inputs), self.field)


def mlp(quick: bool) -> BenchModel:
    width, hidden, batch = (64, 256, 4) if quick else (1024, 4096, 32)
    layers: list[nn.Module] = []
    for i in range(4):  # 4 x Linear alternating width -> hidden -> width
        a, b = (width, hidden) if i % 2 == 0 else (hidden, width)
        layers += [nn.Linear(a, b), nn.GELU()]
    return BenchModel(nn.Sequential(*layers[:-1]), (torch.randn(batch, width),))


def cnn(quick: bool) -> BenchModel:
    """ResNet-18-like: conv / BatchNorm / ReLU stages with residual blocks."""
    size, batch = (32, 1) if quick else (224, 8)
    return BenchModel(ResNetLike().eval(), (torch.randn(batch, 3, size, size),))


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                   nn.BatchNorm2d(cout)) if stride != 1 or cin != cout
                     else nn.Identity())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64),
                                  nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        blocks, cin = [], 64
        for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
            blocks += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


def _gpt2(quick: bool) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = (GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=512, n_positions=256)
              if quick else GPT2Config())  # the 124M architecture, random weights
    return GPT2LMHeadModel(config).eval()


def gpt2(quick: bool) -> BenchModel:
    model = _gpt2(quick)
    model.config.use_cache = False  # one forward: no KV cache to build (and export sees one output)
    tokens = torch.randint(0, model.config.vocab_size, (1, 16 if quick else 128))
    return BenchModel(LogitsOnly(model, "logits"), (tokens,))


def gpt2_generate(quick: bool) -> BenchModel:
    model = _gpt2(quick)
    prompt = torch.randint(0, model.config.vocab_size, (1, 8 if quick else 32))
    return BenchModel(model, (prompt,), kind="generate", new_tokens=8 if quick else 64)


def bert(quick: bool) -> BenchModel:
    from transformers import BertConfig, BertModel

    config = (BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=128, vocab_size=512) if quick else BertConfig())
    batch, length = (2, 16) if quick else (8, 128)
    tokens = torch.randint(0, config.vocab_size, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    return BenchModel(LogitsOnly(BertModel(config).eval(), "last_hidden_state"), (tokens, mask))


MODELS: dict[str, Callable[[bool], BenchModel]] = {
    "mlp": mlp, "cnn": cnn, "gpt2": gpt2, "gpt2-generate": gpt2_generate, "bert": bert,
}
