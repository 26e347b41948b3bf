import torch
import torch.nn as nn
import torch.nn.functional as F
from aten_graphs import call, frozen_aten_graph, ops
from comparisons import assert_same

from jitopt.passes import eliminate_dead_code, remove_noops


class Noisy(nn.Module):
    def forward(self, x):
        y = F.dropout(x, 0.3, training=False) * 1
        y = y.clone().reshape(x.shape) + 0
        y = y[:, :]
        return torch.relu(y.to(torch.float32))


def test_identities_are_removed():
    x = torch.randn(4, 5)
    gm, args = frozen_aten_graph(Noisy().eval(), x)
    removed = remove_noops(gm)
    eliminate_dead_code(gm)
    gm.recompile()
    assert removed >= 2
    assert ops(gm) == ["aten.relu.default"]
    assert_same(call(gm, args)[0], Noisy()(x))


def test_output_copies_and_dtype_changes_are_kept():
    class Keep(nn.Module):
        def forward(self, x):
            return x.clone(), x * 1.0, x.to(torch.float64)

    x = torch.arange(6).reshape(2, 3)  # int64: x * 1.0 promotes to float
    gm, args = frozen_aten_graph(Keep(), x)
    remove_noops(gm)
    gm.recompile()
    out = call(gm, args)
    assert_same(out, Keep()(x))
    assert out[0].data_ptr() != x.data_ptr(), "a returned clone must stay a fresh tensor"


def test_clone_of_a_non_contiguous_tensor_is_kept():
    class Transposed(nn.Module):
        def forward(self, x):
            return x[:, ::2].clone().view(-1).sin()  # clone of a strided slice is dense

    x = torch.randn(3, 4)
    gm, args = frozen_aten_graph(Transposed(), x)
    remove_noops(gm)
    gm.recompile()
    assert_same(call(gm, args)[0], Transposed()(x))
