"""HeapTrimmer: hands the engine worker's freed heap memory back to the OS every few seconds.

Why: on CPU the vLLM worker allocates and frees tensors of many sizes every step (torch's CPU
allocator keeps no cache), and glibc keeps freed chunks inside its heap instead of returning
them. Under long mixed load the worker's resident memory then creeps up although nothing leaks.
Measured on a 2-core x86 VM (docs/BENCHMARKS.md, "Soak"): after 2,000 mixed requests the worker
had grown 2,896 -> 3,037 MiB from its 500-request level, and one `malloc_trim(0)` brought it
back to 2,808 MiB; plain vLLM without VAS grows the same way (2,689 -> 2,959 MiB over the same
load). vLLM 0.32 never trims (its CPU worker has no such call). The VAS processor runs inside the
worker, once per step, so it owns the trimming.

`malloc_trim(0)` walks glibc's free lists and madvises their pages away; the pages a later step
needs again are faulted back in. Checked once per engine step, it runs at most every
`interval_s` seconds (by wall time, not steps: a CPU step at batch 64 can take a second, one at
batch 1 a few milliseconds), so its cost is a small fixed share of the worker's time, which the
metrics report (`vas_worker_heap_trim_seconds`). Off glibc (musl, macOS) there is nothing to call;
with another allocator preloaded the call finds glibc's heap empty: a no-op.
"""

from __future__ import annotations

import ctypes
import time
from typing import Callable

DEFAULT_INTERVAL_S = 10.0


def glibc_malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none."""
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the C library the process already runs on
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


class HeapTrimmer:
    """Trims the heap on the first step at least `interval_s` seconds after the last trim (or after
    start); `interval_s` None: never. `clock` is injectable for tests."""

    def __init__(self, interval_s: float | None = DEFAULT_INTERVAL_S, trim: Callable[[int], int] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.trim = trim if trim is not None else glibc_malloc_trim()
        self.clock = clock
        self.last = clock()
        self.trims = 0
        self.seconds = 0.0  # time spent in trim calls

    def step(self) -> None:
        if self.trim is None or self.interval_s is None or self.clock() - self.last < self.interval_s:
            return
        start = time.perf_counter()
        self.trim(0)
        self.seconds += time.perf_counter() - start
        self.trims += 1
        self.last = self.clock()
