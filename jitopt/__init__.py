"""jitopt: a PyTorch-native JIT compiler backend.

    fast = torch.compile(model, backend="jitopt")
    @jitopt.optimize
    served = jitopt.for_inference(model)

The public names load lazily, so `jitopt.runtime` (which runs compiled artifacts) imports
without pulling in the compiler.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

__version__ = "0.1.0"

# In a source checkout passes/, codegen/ and runtime/ sit beside jitopt/ (an install maps them
# to jitopt.passes etc.). When this jitopt/ is imported straight from a checkout (the repository
# root on sys.path), find them beside it, so the subpackages never come from another copy.
_checkout = Path(__file__).resolve().parent.parent
if all((_checkout / name / "__init__.py").is_file() for name in ("passes", "codegen", "runtime")):
    __path__.append(str(_checkout))

_PUBLIC = {
    "backend": "jitopt.compiler",
    "Config": "jitopt.config",
    "optimize": "jitopt.api",
    "for_inference": "jitopt.api",
    "finish_compiles": "jitopt.api",
    "explain": "jitopt.explain",
    "calibrate": "jitopt.calibration",
    "Int8KVCache": "jitopt.kv_cache_int8",
    "Calibration": "jitopt.calibration",
    "ExplainReport": "jitopt.explain",
    "counters": "jitopt.debug",
    "reset_counters": "jitopt.debug",
    "JitoptError": "jitopt.errors",
    "JitoptFallbackWarning": "jitopt.errors",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'jitopt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))
