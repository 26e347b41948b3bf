import copy

import torch
import torch.nn as nn
from comparisons import assert_same

import jitopt


def test_three_sgd_steps_match_eager():
    eager = nn.Sequential(nn.Linear(10, 32), nn.GELU(), nn.Linear(32, 32), nn.ReLU(),
                          nn.Linear(32, 3))
    mine = copy.deepcopy(eager)
    fast = torch.compile(mine, backend="jitopt")
    opt_e = torch.optim.SGD(eager.parameters(), lr=0.1, momentum=0.9)
    opt_m = torch.optim.SGD(mine.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x, target = torch.randn(16, 10), torch.randint(0, 3, (16,))
        for model, fn, opt in ((eager, eager, opt_e), (mine, fast, opt_m)):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(fn(x), target)
            loss.backward()
            opt.step()
        for p_e, p_m in zip(eager.parameters(), mine.parameters()):
            assert_same(p_m, p_e, atol=1e-6)
    assert jitopt.counters["graphs"]["compiled_forward"] >= 1
    assert jitopt.counters["graphs"]["compiled_backward"] >= 1


def test_batchnorm_in_training_mode_updates_running_stats():
    eager = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    mine = copy.deepcopy(eager)
    fast = torch.compile(mine, backend="jitopt")
    x = torch.randn(2, 3, 8, 8)
    out_e, out_m = eager(x), fast(x)
    assert_same(out_m, out_e, atol=1e-5)
    out_e.sum().backward()
    out_m.sum().backward()
    assert_same(mine[1].running_mean, eager[1].running_mean)
    assert_same(mine[0].weight.grad, eager[0].weight.grad, atol=1e-4)
