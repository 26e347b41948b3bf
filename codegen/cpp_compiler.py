"""Compile generated C++ into a shared library with the system compiler, through the cache."""

from __future__ import annotations

import functools
import hashlib
import os
import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from jitopt.runtime.kernel_cache import KernelCache

CACHE_FORMAT = 1  # bump when the library layout or launcher contract changes


class CppCompileError(RuntimeError):
    """The C++ compiler is missing or rejected the generated source."""


def compiler() -> str:
    """$CXX, else g++."""
    return os.environ.get("CXX") or "g++"


def openmp_runtime() -> Path | None:
    """The OpenMP runtime torch itself loaded. Kernels must link the same one: two OpenMP
    runtimes in one process each keep a pool of spinning threads, and on a small machine
    they starve each other."""
    lib = Path(torch.__file__).parent / "lib"
    for name in ("libgomp.so.1", "libiomp5.so", "libomp.so"):
        if (lib / name).exists():
            return lib / name
    return None


def flags() -> list[str]:
    """Everything that changes the generated machine code; all of it goes in the cache key."""
    base = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fno-math-errno",
            "-fno-trapping-math", "-std=c++17", "-shared", "-fPIC", "-fopenmp",
            "-fno-semantic-interposition"]
    omp = openmp_runtime()
    if omp is not None:
        base += [f"-L{omp.parent}", f"-Wl,-rpath,{omp.parent}", f"-l:{omp.name}"]
    return base + ["-lmvec", "-lm"]


@functools.lru_cache(maxsize=None)
def _toolchain_identity(cxx: str) -> str:
    """Compiler version and the host CPU's features: a library built for another CPU or by
    another compiler is a different entry."""
    try:
        version = subprocess.run([*shlex.split(cxx), "--version"], capture_output=True,
                                 text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise CppCompileError(f"C++ compiler {cxx!r} not found or not runnable ({e}); set CXX "
                              "to a working compiler, or kernels run on ATen") from e
    return version + _cpu_features()


def _cpu_features() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return os.uname().machine
    flags_lines = [line for line in text.splitlines() if line.startswith(("flags", "model name"))]
    return "\n".join(sorted(set(flags_lines)))


def cache_key(source: str, cxx: str, build_flags: list[str]) -> str:
    from jitopt import __version__

    h = hashlib.sha256()
    for part in (str(CACHE_FORMAT), source, cxx, " ".join(build_flags),
                 _toolchain_identity(cxx), torch.__version__, __version__):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()


def compile_library(source: str, cache: KernelCache | None = None) -> Path:
    """The path of a shared library built from `source` (from the cache when it is there)."""
    build = LibraryBuild(source, cache)
    return build.cached() or build.run()


class LibraryBuild:
    """One library to build: compiler, flags, cache and key fixed when it is made, so a build
    run later in another thread uses what the caller's environment said."""

    def __init__(self, source: str, cache: KernelCache | None = None) -> None:
        self.source, self.cache = source, cache or KernelCache()
        self.cxx, self.flags = compiler(), flags()
        self.key = cache_key(source, self.cxx, self.flags)

    def cached(self) -> Path | None:
        return self.cache.lookup(self.key, ".so")

    def run(self, background: bool = False) -> Path:
        """Compile (seconds for a large graph) and store in the cache. `background`: at low
        CPU priority, so the graph running meanwhile on ATen is not slowed by it."""
        with tempfile.TemporaryDirectory(prefix="jitopt-cxx-") as tmp:
            src, out = Path(tmp) / "kernels.cpp", Path(tmp) / "kernels.so"
            src.write_text(self.source)
            nice = ["nice", "-n", "10"] if background and shutil.which("nice") else []
            command = [*nice, *shlex.split(self.cxx), str(src), "-o", str(out), *self.flags]
            try:
                result = subprocess.run(command, capture_output=True, text=True, timeout=600)
            except (OSError, subprocess.SubprocessError) as e:
                raise CppCompileError(f"could not run the C++ compiler {self.cxx!r}: {e}") from e
            if result.returncode != 0:
                tail = "\n".join(result.stderr.strip().splitlines()[-15:])
                raise CppCompileError(f"{self.cxx} failed on generated kernels:\n{tail}")
            return self.cache.store(self.key, ".so", out.read_bytes())
