"""The worker's heap trimming (vas_server.engine.heap): how often it trims, and that it finds glibc."""

from __future__ import annotations

import gc
import os
import platform
import time

import pytest

from vas_server.engine.heap import HeapTrimmer, glibc_malloc_trim


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_trims_at_most_once_per_interval_and_counts_it():
    calls, clock = [], Clock()

    def trim(pad: int) -> int:  # takes a measurable 20 ms, like a real trim of a large heap
        calls.append(pad)
        time.sleep(0.02)
        return 1

    trimmer = HeapTrimmer(interval_s=10, trim=trim, clock=clock)
    for now in (0, 5, 9.9, 10, 12, 19.9, 20.1, 45):
        clock.now = now
        trimmer.step()
    assert calls == [0, 0, 0] and trimmer.trims == 3  # at 10, 20.1 and 45
    assert 0.06 <= trimmer.seconds < 1.0  # the time spent in the three trims, not in the steps between


def test_none_means_never():
    clock = Clock()
    trimmer = HeapTrimmer(interval_s=None, trim=lambda pad: pytest.fail("trimmed"), clock=clock)
    clock.now = 1e9
    trimmer.step()
    assert trimmer.trims == 0


def _rss() -> int:
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_glibc_malloc_trim_gives_freed_heap_back():
    """What the worker trims for: memory malloc keeps after a burst of small allocations is
    freed (a few survivors scattered through the heap stop it from shrinking by itself) goes
    back to the OS. Measured here: 222 MiB resident before the trim, 29 MiB after."""
    trim = glibc_malloc_trim()
    assert trim is not None
    blocks = [bytearray(1024) for _ in range(200_000)]  # ~220 MiB of 1 KiB malloc chunks (past pymalloc's 512 B)
    survivors = blocks[::200]
    del blocks
    gc.collect()
    before = _rss()
    assert trim(0) == 1  # 1: memory was given back
    assert before - _rss() > 100 * 2**20, (before, _rss())
    del survivors
