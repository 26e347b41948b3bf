"""jitopt.calibrate: the input ranges its observers record for int8-static."""

import gc

import pytest
import torch
import torch.nn as nn

import jitopt
from jitopt import calibration
from jitopt.calibration import input_range


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()


def _batches_with_one_outlier():
    batches = [torch.rand(2, 1, 16, 16) * 2 - 1 for _ in range(4)]  # values in [-1, 1)
    batches[2][0, 0, 5, 5] = 50.0
    return batches


def test_minmax_records_the_extremes_of_every_conv_input():
    model, batches = _model(), _batches_with_one_outlier()
    result = jitopt.calibrate(model, batches)
    lo, hi = result.ranges["0"]
    assert lo == min(b.min().item() for b in batches) and hi == 50.0
    with torch.no_grad():
        inner = [torch.relu(model[0](b)) for b in batches]
    assert result.ranges["2"] == pytest.approx(
        (min(t.min().item() for t in inner), max(t.max().item() for t in inner)))
    assert input_range(model[0].weight) == result.ranges["0"]
    assert "0: [" in str(result) and result.batches == 4


@pytest.mark.parametrize("options", [dict(observer="percentile", percentile=99.9),
                                     dict(observer="entropy")])
def test_percentile_and_entropy_clip_a_rare_outlier(options):
    model = _model()  # the outlier is 1 of 2048 values: inside a 0.1% tail
    ranges = jitopt.calibrate(model, _batches_with_one_outlier(), **options).ranges
    lo, hi = ranges["0"]
    assert -1.05 < lo < -0.5 and 0.5 < hi < 5.0  # the bulk kept, the 50 clipped
    relu_lo, _ = ranges["2"]
    assert relu_lo == 0.0  # a ReLU's output stays one-sided


def test_entropy_keeps_a_dense_range_whole():
    model = _model()
    batches = [torch.rand(4, 1, 16, 16) for _ in range(3)]
    lo, hi = jitopt.calibrate(model, batches, observer="entropy").ranges["0"]
    assert lo == pytest.approx(min(b.min().item() for b in batches))
    assert hi > 0.9


def test_ranges_go_with_the_model():
    model = _model()
    jitopt.calibrate(model, [torch.randn(1, 1, 8, 8)])
    assert input_range(model[0].weight) is not None
    keys = [calibration._key(m.weight) for m in (model[0], model[2])]
    assert all(k in calibration._RANGES for k in keys)
    del model
    gc.collect()
    assert not any(k in calibration._RANGES for k in keys)


@pytest.mark.parametrize("kwargs, message", [
    (dict(observer="max"), "observer must be one of"),
    (dict(percentile=0), "percentile must be in"),
])
def test_bad_arguments_name_the_valid_choices(kwargs, message):
    with pytest.raises(ValueError, match=message):
        jitopt.calibrate(_model(), [torch.randn(1, 1, 8, 8)], **kwargs)


def test_no_batches_or_no_convolutions_is_an_error():
    with pytest.raises(ValueError, match="no batches"):
        jitopt.calibrate(_model(), [])
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        jitopt.calibrate(nn.Linear(2, 2), [torch.randn(1, 2)])


@pytest.mark.parametrize("observer", ["percentile", "entropy"])
def test_an_input_that_never_varies_keeps_its_one_value(observer):
    model = _model()
    ranges = jitopt.calibrate(model, [torch.full((1, 1, 8, 8), -2.0)], observer=observer).ranges
    assert ranges["0"] == (-2.0, -2.0)
