import logging
import warnings

import pytest
import torch
import torch.nn as nn
from comparisons import assert_same

import jitopt
import jitopt.compiler
from jitopt.passes import PIPELINE


def broken_pass(gm):
    raise RuntimeError("boom from a broken pass")


@pytest.fixture
def broken_pipeline(monkeypatch):
    monkeypatch.setattr(jitopt.compiler, "PIPELINE", [broken_pass, *PIPELINE])


def _model():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()


def test_internal_error_warns_once_falls_back_and_counts(broken_pipeline):
    model = _model()
    fast = torch.compile(model, backend="jitopt", options={"on_error": "warn"})
    x = torch.randn(3, 4)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        assert_same(fast(x), model(x))
        assert_same(fast(x), model(x))
    messages = [str(w.message) for w in caught if w.category is jitopt.JitoptFallbackWarning]
    assert len(messages) == 1, messages
    assert "pass broken_pass failed" in messages[0] and "boom" in messages[0]
    assert jitopt.counters["fallbacks"]["inference graph pipeline"] == 1


def test_on_error_raise_makes_it_an_exception(broken_pipeline):
    fast = torch.compile(_model(), backend="jitopt", options={"on_error": "raise"})
    with pytest.raises(Exception, match="boom from a broken pass"), torch.no_grad():
        fast(torch.randn(3, 4))


def test_explain_reports_the_fallback(broken_pipeline):
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        report = jitopt.explain(_model(), torch.randn(3, 4), on_error="warn")
    assert any("boom" in f for f in report.fallbacks)
    assert "fallback" in str(report)


def test_logs_through_the_jitopt_logger_and_never_sets_levels(caplog):
    with caplog.at_level(logging.DEBUG, logger="jitopt"), torch.no_grad():
        torch.compile(_model(), backend="jitopt")(torch.randn(2, 4))
    assert any(r.name == "jitopt" and "compiled inference graph" in r.getMessage()
               for r in caplog.records)
    assert logging.getLogger("jitopt").level in (logging.NOTSET, logging.DEBUG)
    logging.getLogger("jitopt").setLevel(logging.NOTSET)
    import jitopt.compiler  # noqa: F401  (importing must not change it either)
    assert logging.getLogger("jitopt").level == logging.NOTSET
