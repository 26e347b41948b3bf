"""Embedding tables over frozen weights to int8 rows, with the int8 and int4 quantize modes."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import jitopt

INT8_MAX = 127.0


class TiedLM(nn.Module):
    """An embedding table shared with the output layer, as GPT-2 ties wte and lm_head."""

    def __init__(self, vocab: int = 96, width: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.mix = nn.Linear(width, width)
        self.head = nn.Linear(width, vocab, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids):
        return self.head(torch.tanh(self.mix(self.embed(ids))))


def _rows_int8(table: torch.Tensor) -> torch.Tensor:
    """The oracle's rounding: symmetric int8 per row, back in float."""
    scale = (table.abs().amax(dim=1, keepdim=True) / INT8_MAX).clamp_min(1e-12)
    return torch.round(table / scale).clamp(-INT8_MAX, INT8_MAX) * scale


@pytest.mark.parametrize("mode", ["int8", "int8-weight-only", "int4-weight-only"])
def test_lookups_read_int8_rows_and_no_fp32_table_is_held(mode):
    torch.manual_seed(0)
    model, ids = TiedLM().eval(), torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        report = jitopt.explain(model, ids, quantize=mode)
        got = torch.compile(model.embed, backend="jitopt", options={"quantize": mode})(ids)
    assert jitopt.counters["passes"]["quantize_embedding_int8"] >= 1
    torch.testing.assert_close(got, F.embedding(ids, _rows_int8(model.embed.weight.detach())),
                               atol=1e-6, rtol=1e-6)
    aten = report.graphs[0].aten[0]
    (table,) = [q for q in aten.quantized_layers if q.get("kind") == "embedding"]
    assert table["shape"] == [96, 32] and table["weight_sqnr_db"] > 35
    # Neither the lookup nor the tied output layer keeps the fp32 table alive in the graph.
    assert aten.constant_bytes.get("float32", 0) < 4 * 96 * 32
    assert aten.quantization_error["cosine"] > 0.99


def test_other_modes_leave_embeddings_alone():
    torch.manual_seed(0)
    model, ids = TiedLM().eval(), torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        got = torch.compile(model, backend="jitopt", options={"quantize": "bf16"})(ids)
        torch.testing.assert_close(got, model(ids), atol=0.05, rtol=0.05)
    assert jitopt.counters["passes"]["quantize_embedding_int8"] == 0


def test_lookups_of_constant_indices():
    """Regression: BERT looks up its token-type embeddings with a constant index buffer
    (too large a result for fold_constants to fold), whose meta value is not a fake tensor;
    the pass took its fake mode from there and failed."""
    class TokenTypes(nn.Module):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(2, 8)
            self.register_buffer("types", torch.zeros(1, 24, dtype=torch.long),
                                 persistent=False)

        def forward(self, x):
            return x + self.table(self.types)

    torch.manual_seed(0)
    model, x = TokenTypes().eval(), torch.randn(2, 24, 8)
    with torch.no_grad():
        got = torch.compile(model, backend="jitopt",
                            options={"quantize": "int8-weight-only"})(x)
        want = x + F.embedding(model.types, _rows_int8(model.table.weight.detach()))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    assert jitopt.counters["passes"]["quantize_embedding_int8"] == 1
