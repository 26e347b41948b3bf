"""Comparison helpers shared by the tests."""

from __future__ import annotations

import torch


def assert_same(actual, expected, *, rtol: float = 1.3e-6, atol: float = 1e-5) -> None:
    """Compare nested outputs with eager: same structure, dtypes and shapes, close values."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), type(actual)
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected)
        for a, e in zip(actual, expected):
            assert_same(a, e, rtol=rtol, atol=atol)
    elif isinstance(expected, dict):
        assert actual.keys() == expected.keys()
        for k in expected:
            assert_same(actual[k], expected[k], rtol=rtol, atol=atol)
    else:
        assert actual == expected
