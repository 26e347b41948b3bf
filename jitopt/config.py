"""The one set of jitopt options: a frozen dataclass, defaults in exactly one place."""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any, Literal

ON_ERROR_CHOICES = ("warn", "raise")
QUANTIZE_IMPLEMENTED = ("int8", "int8-weight-only", "int4-weight-only", "bf16", "fp16",
                        "int8-static")
VERIFY_CHOICES = ("end", "each")


@dataclasses.dataclass(frozen=True)
class Config:
    """Options for one compilation. Build with `Config.from_options(...)` to get validation."""

    on_error: Literal["warn", "raise"] = "warn"
    """What an internal compile error does: "warn" runs that graph (or partition) on ATen with
    one warning and counts a fallback; "raise" makes it an exception. Default from the
    environment variable JITOPT_ON_ERROR when set."""

    freeze_weights: bool = True
    """In inference (nothing requires grad), treat parameters and buffers as constants so passes
    can fold them. A weight changed in place after compiling is detected and recompiled."""

    disabled_passes: tuple[str, ...] = ()
    """Names of pipeline passes to skip (see `jitopt.passes.PIPELINE`)."""

    targets: tuple[str, ...] = ("triton", "cpp", "aten")
    """Lowering targets to try, in order of preference: "triton" (generated Triton kernels for
    the fusion groups on CUDA), "cpp" (generated C++ kernels for those on CPU and the
    attention kernel), "aten". ATen always runs what no other target takes, so it is implied;
    ("aten",) turns code generation off."""

    autotune: bool = False
    """Spend extra compile time measuring alternative lowerings and keep the fastest. Targets
    that offer alternatives honour it; the ATen target has exactly one lowering."""

    debug_dir: str | None = None
    """Write numbered graph dumps and generated source here. Default from JITOPT_DEBUG_DIR."""

    quantize: str | None = None
    """Lower precision for linear layers (convolutions for "int8-static") over frozen fp32
    weights on CPU (inference only).
    "int8": per-token int8 activations (scaled at run time) times per-channel int8 weights,
    an int32 product (fastest where the matmuls are compute-bound: prefill, encoders).
    "int8-weight-only": per-channel int8 weights, float32 activations and arithmetic (for
    memory-bound decoding: a quarter of the weight bytes, only the weights' rounding error).
    "int4-weight-only": 4-bit weights in groups along the input channels (see
    `quantize_group_size`), float32 activations and arithmetic: an eighth of the bytes.
    "bf16": bfloat16 compute on oneDNN (float32 sums) for each layer where that is timed
    faster than fp32, and for decoding-sized layers (<= 8 rows) bfloat16 weights with float32
    activations and arithmetic. "fp16": float16 weights with float32 activations and
    arithmetic for layers of at most 128 rows (oneDNN has no fast float16 path on CPUs without
    AVX512-FP16); other layers keep fp32.
    "int8-static": 2-D convolutions over frozen weights as uint8 x int8 oneDNN convolutions,
    with each input's scale fixed by `jitopt.calibrate(model, batches)` beforehand (for conv
    nets; convolutions not calibrated, and linear layers, keep fp32).
    `jitopt.explain` lists each quantized layer with its weight's SQNR. Not exact: check the outputs against fp32 for your model. None: full precision."""

    quantize_min_sqnr_db: float | None = None
    """An accuracy budget for `quantize`: a layer whose output SQNR, measured on the example
    inputs, would fall below this many dB stays in fp32 (explain says which and why). 30-40
    dB keeps most models' outputs within 1e-3 relative; None quantizes every layer."""

    quantize_max_error: float | None = None
    """An end-to-end accuracy budget for `quantize`: the largest relative error
    ||y_q - y|| / ||y|| of the graph's outputs against fp32 on the example inputs. Layers stay
    in fp32, the most sensitive (lowest output SQNR) first, until an estimate (the fp32
    graph run with each remaining layer quantized alone in eager) meets it; explain lists
    which were kept and why, and the compiled graph's measured error. None: no such budget."""

    quantize_group_size: int | None = None
    """For quantize="int4-weight-only": input channels per group sharing one scale and offset
    (smaller: more accurate, more bytes). None: 64."""

    cuda_graphs: bool = True
    """On CUDA: replay an inference graph with static sizes from one captured CUDA graph after
    two warm-up calls (inputs copied in, outputs copied out), so its kernels do not pay a
    Python launch each. Graphs the capture rejects run as before, with a warning."""

    kv_cache: bool = True
    """Key/value caches that a decode step grows with torch.cat (Hugging Face's DynamicCache,
    a past_key_values loop) become appends into a buffer with spare capacity, so a step no
    longer copies the whole cache. Same values as cat; only the strides differ. False: cat."""

    kv_cache_max_tokens: int | None = None
    """Cap on a cache buffer's length along its sequence dimension; a cache growing past it
    goes back to copying (cat). None: no cap (a buffer is at most twice the tokens held)."""

    background_compile: bool = True
    """Build generated C++ in a background thread: until the compiler finishes, those
    partitions run their ATen ops, so the first call does not wait for g++
    (`jitopt.finish_compiles()` waits for it). A build that fails leaves them on ATen with one
    warning. Off, or with on_error="raise", the compile waits for the build. Default from
    JITOPT_BACKGROUND_COMPILE ("0" turns it off) when set."""

    verify: Literal["end", "each"] = "end"
    """Check the graph invariants (passes/README.md) after the whole pipeline, or after each
    pass (slower, points at the pass that broke one)."""

    def _check_budget(self, name: str, kind: str, valid: Any) -> None:
        """An accuracy budget is a number `valid` accepts, and needs a quantize mode."""
        value = getattr(self, name)
        if value is None:
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not valid(value):
            raise ValueError(f"jitopt option {name!r} must be {kind} or None, got {value!r}")
        if self.quantize is None:
            raise ValueError(f"jitopt option {name!r} is a budget for 'quantize'; set quantize "
                             f"too (valid choices: {list(QUANTIZE_IMPLEMENTED)})")

    def __post_init__(self) -> None:
        _check_choice("on_error", self.on_error, ON_ERROR_CHOICES)
        _check_choice("verify", self.verify, VERIFY_CHOICES)
        _check_quantize(self.quantize)
        self._check_budget("quantize_min_sqnr_db", "a number of dB", lambda v: True)
        self._check_budget("quantize_max_error", "a positive relative error (0.01 is 1%)",
                           lambda v: v > 0)
        if self.quantize_group_size is not None:
            if (isinstance(self.quantize_group_size, bool)
                    or not isinstance(self.quantize_group_size, int)
                    or self.quantize_group_size < 1):
                raise ValueError("jitopt option 'quantize_group_size' must be a positive "
                                 f"integer or None, got {self.quantize_group_size!r}")
            if self.quantize != "int4-weight-only":
                raise ValueError("jitopt option 'quantize_group_size' applies to "
                                 "quantize='int4-weight-only' only, not to "
                                 f"quantize={self.quantize!r}")
        if self.kv_cache_max_tokens is not None and (
                isinstance(self.kv_cache_max_tokens, bool)
                or not isinstance(self.kv_cache_max_tokens, int) or self.kv_cache_max_tokens < 1):
            raise ValueError("jitopt option 'kv_cache_max_tokens' must be a positive integer "
                             f"or None, got {self.kv_cache_max_tokens!r}")
        for name in ("freeze_weights", "autotune", "background_compile", "kv_cache",
                     "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"jitopt option {name!r} must be True or False, "
                                 f"got {getattr(self, name)!r}")
        _check_names("disabled_passes", self.disabled_passes, _known_passes())
        _check_names("targets", self.targets, _known_targets())

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None = None, *,
                     mode: str | None = None) -> "Config":
        """Validate user options (from torch.compile, the decorator or for_inference)."""
        options = dict(options or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - fields)
        if unknown:
            raise ValueError(f"unknown jitopt option(s) {unknown}; valid options are "
                             f"{sorted(fields)}")
        if mode is not None and mode not in PRESETS:
            raise ValueError(f"unknown mode {mode!r}; valid modes are {sorted(PRESETS)}")
        values: dict[str, Any] = dict(_environment_defaults())
        values.update(PRESETS[mode or "default"])
        values.update(options)
        for key in ("disabled_passes", "targets"):
            if isinstance(values.get(key), (list, set)):
                values[key] = tuple(values[key])
            if isinstance(values.get(key), str):
                values[key] = (values[key],)
        return cls(**values)

    def replace(self, **changes: Any) -> "Config":
        return dataclasses.replace(self, **changes)


PRESETS: dict[str, dict[str, Any]] = {
    # torch.compile(mode=...) maps to these. "default": every pass, the default targets.
    "default": {},
    # "reduce-overhead": per-call overhead is what matters; same lowering as default (the
    # generated wrapper is already the low-overhead path on CPU).
    "reduce-overhead": {},
    # "max-autotune": longer compiles for faster code: measure alternative lowerings.
    "max-autotune": {"autotune": True},
}


def _environment_defaults() -> dict[str, Any]:
    env: dict[str, Any] = {}
    if os.environ.get("JITOPT_ON_ERROR"):
        env["on_error"] = os.environ["JITOPT_ON_ERROR"]
    if os.environ.get("JITOPT_BACKGROUND_COMPILE"):
        env["background_compile"] = os.environ["JITOPT_BACKGROUND_COMPILE"] != "0"
    if os.environ.get("JITOPT_DEBUG_DIR"):
        env["debug_dir"] = os.environ["JITOPT_DEBUG_DIR"]
    return env


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"jitopt option {name!r} got {value!r}; valid choices are "
                         f"{list(choices)}")


def _check_quantize(mode: Any) -> None:
    if mode is None or mode in QUANTIZE_IMPLEMENTED:
        return
    raise ValueError(f"jitopt option 'quantize' got {mode!r}; valid choices are "
                     f"{list(QUANTIZE_IMPLEMENTED)} (or None)")


def _check_names(name: str, values: Any, known: tuple[str, ...]) -> None:
    if not isinstance(values, tuple) or not all(isinstance(v, str) for v in values):
        raise ValueError(f"jitopt option {name!r} must be a list of names from {list(known)}")
    bad = [v for v in values if v not in known]
    if bad:
        raise ValueError(f"jitopt option {name!r} got unknown name(s) {bad}; valid choices "
                         f"are {list(known)}")


def _known_passes() -> tuple[str, ...]:
    from jitopt.passes import PIPELINE

    return tuple(p.__name__ for p in PIPELINE)


def _known_targets() -> tuple[str, ...]:
    from jitopt.codegen.targets import TARGETS

    return tuple(TARGETS)


_active_patch: dict[str, Any] = {}


@contextlib.contextmanager
def patch(**changes: Any) -> Iterator[None]:
    """Override options for every compile in this block (for tests)."""
    old = dict(_active_patch)
    _active_patch.update(changes)
    try:
        yield
    finally:
        _active_patch.clear()
        _active_patch.update(old)


def resolve(options: Mapping[str, Any] | None, mode: str | None = None) -> Config:
    """The Config one compile uses: environment, then preset, then options, then patch()."""
    merged = dict(options or {})
    merged.update(_active_patch)
    return Config.from_options(merged, mode=mode)
