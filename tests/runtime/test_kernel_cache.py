"""KernelCache: whole entries or none; a damaged entry is dropped, never loaded."""

import multiprocessing

from jitopt.runtime.kernel_cache import KernelCache


def test_store_then_lookup_returns_the_bytes(tmp_path):
    cache = KernelCache(tmp_path)
    path = cache.store("ab" * 32, ".so", b"library bytes")
    assert cache.lookup("ab" * 32, ".so") == path
    assert path.read_bytes().startswith(b"library bytes")
    assert not list(path.parent.glob("*.tmp"))  # the temporary file was renamed, not left


def test_missing_entry_is_none(tmp_path):
    assert KernelCache(tmp_path).lookup("cd" * 32, ".so") is None


def test_truncated_entry_is_removed_and_reported_missing(tmp_path):
    cache = KernelCache(tmp_path)
    path = cache.store("ef" * 32, ".so", b"x" * 1000)
    path.write_bytes(path.read_bytes()[:500])  # a crash mid-copy, a full disk
    assert cache.lookup("ef" * 32, ".so") is None
    assert not path.exists()


def test_corrupted_byte_is_detected(tmp_path):
    cache = KernelCache(tmp_path)
    path = cache.store("12" * 32, ".so", b"y" * 100)
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cache.lookup("12" * 32, ".so") is None


def _store_many(root, worker):
    cache = KernelCache(root)
    for _ in range(50):
        cache.store("34" * 32, ".so", b"same content" * 100)
        assert cache.lookup("34" * 32, ".so") is not None, worker


def test_concurrent_writers_never_expose_a_partial_entry(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_store_many, args=(tmp_path, k)) for k in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert KernelCache(tmp_path).lookup("34" * 32, ".so") is not None
