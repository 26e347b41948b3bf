"""RecycledOutput: a large output's memory comes back only when nothing can still see it."""

import threading

import torch

from jitopt.runtime.cpp_loader import HUGE_PAGE_MIN_BYTES, RecycledOutput

ROWS, COLS = 1024, 1024  # 4 MiB of float32: large enough to be recycled
assert ROWS * COLS * 4 >= HUGE_PAGE_MIN_BYTES


def _take(slot):
    return slot((ROWS, COLS), (COLS, 1), torch.float32)


def test_a_dropped_output_is_reused():
    slot = RecycledOutput()
    first = _take(slot)
    ptr = first.data_ptr()
    del first
    again = _take(slot)
    assert again.data_ptr() == ptr and again.shape == (ROWS, COLS) and again.stride() == (COLS, 1)


def test_a_kept_output_or_view_is_never_reused():
    slot = RecycledOutput()
    kept = _take(slot).fill_(1.0)
    other = _take(slot)
    assert other.data_ptr() != kept.data_ptr()
    view = other[3:5]                      # only a view of the second output survives
    del other
    third = _take(slot).fill_(2.0)
    assert third.data_ptr() != view.data_ptr() - 3 * COLS * 4
    assert bool((kept == 1).all())


def test_small_outputs_are_plain_allocations():
    slot = RecycledOutput()
    a = slot((4, 4), (4, 1), torch.float32)
    assert slot.storage is None and a.shape == (4, 4)


def test_threads_never_share_a_buffer():
    slot = RecycledOutput()
    seen, lock = [], threading.Lock()

    def work():
        for _ in range(50):
            t = _take(slot)
            with lock:
                assert t.data_ptr() not in seen
                seen.append(t.data_ptr())
            with lock:
                seen.remove(t.data_ptr())

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def test_compiled_outputs_kept_across_calls_stay_intact():
    def fn(x):
        return torch.sigmoid(x * 2 + 1)

    compiled = torch.compile(fn, backend="jitopt")
    x1, x2 = torch.randn(ROWS, COLS), torch.randn(ROWS, COLS)
    out1 = compiled(x1)
    out2 = compiled(x2)                    # out1 is still held: must not be overwritten
    torch.testing.assert_close(out1, fn(x1))
    torch.testing.assert_close(out2, fn(x2))
    ptr = out2.data_ptr()
    del out2
    out3 = compiled(x1)                    # out2 was dropped: its memory may serve out3
    torch.testing.assert_close(out3, fn(x1))
    torch.testing.assert_close(out1, fn(x1))
    assert out3.data_ptr() == ptr
