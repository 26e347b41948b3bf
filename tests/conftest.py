import os

# A silent fallback to ATen would make every test pass vacuously: make it an error.
os.environ["JITOPT_ON_ERROR"] = "raise"
# Kernels built before the first call returns, so tests see them run (tests/codegen/
# test_background_compile.py turns this on where it is the subject).
os.environ["JITOPT_BACKGROUND_COMPILE"] = "0"

import pytest  # noqa: E402
import torch  # noqa: E402

import jitopt  # noqa: E402


@pytest.fixture(autouse=True)
def fresh_state():
    """Each test starts with Dynamo's caches empty, zeroed counters and a fixed seed."""
    torch._dynamo.reset()
    jitopt.reset_counters()
    torch.manual_seed(0)
    yield
    torch._dynamo.reset()
