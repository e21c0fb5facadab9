"""Keep freed CPU memory in the process while training (glibc's ``malloc``).

An S2H step holds two networks' activations at once (the soft and the hard
branch) and frees them in bulk during its backward. glibc returns a free heap
top larger than its trim threshold to the kernel at once, and the next
allocations fault those pages back in one by one. Whether that happens every
step depends on the heap's layout: in ``fit``'s own loop on ResNet-50 (CPU,
batch 32, 64x64, one thread) glibc's dynamic thresholds settle after about eight
steps (25,000-200,000 minor page faults per step before, almost none after);
between the other kinds of step that ``benchmarks/overhead.py`` interleaves with
it they never settle: about 100,000 faults per S2H step, 0.15-0.2 of a dense
step's time.

:func:`kept_heap` raises the trim threshold while a block runs (a training
epoch: :class:`s2h_fx.loop.Loop` does it on the CPU), so freed memory stays in
the heap for the next step as a caching allocator would keep it, and on leaving
returns what is free to the kernel (``malloc_trim``) and puts the threshold back
to the value glibc's own dynamic rule converges to. Setting one threshold
switches glibc's dynamic rule off for both, so the mmap threshold is fixed at
that rule's ceiling (32 MiB on 64-bit): allocations above it are mapped and
unmapped per call either way. The resident size of the process stays at the peak
of a step while the block runs; that is the cost. What it buys in ``fit`` is
certainty rather than speed where glibc settles anyway (that ResNet-50's
training throughput was the same with it and without, ``benchmarks/fit_speed.py``);
in the benchmark it makes the interleaved steps pay what ``fit``'s settled steps
pay.

Elsewhere (another C library, or a platform without ``mallopt``) it does nothing
and says so once in the log.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import logging
import platform
from collections.abc import Iterator

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
MMAP_CEILING = 32 << 20  # glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit
TRIM_SETTLED = 2 * MMAP_CEILING  # where the dynamic trim threshold ends up
KEEP_ALL = (1 << 31) - 1  # mallopt takes an int: never trim

_depth = 0  # kept_heap blocks open now (nested blocks: the outermost one restores)


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    """The C library when it is glibc with ``mallopt`` and ``malloc_trim``, else None
    (looked up once)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        log.info("not glibc: the heap's trim threshold is left as it is")
        return None
    try:
        lib = ctypes.CDLL("libc.so.6")  # glibc's soname on every Linux it runs
        lib.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        lib.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError) as e:
        log.info("glibc's mallopt is not reachable (%s): freed memory is returned to "
                 "the kernel as usual", e)
        return None
    return lib


def set_trim_threshold(value: int) -> bool:
    """Set glibc's trim and mmap thresholds (the latter to its dynamic ceiling).
    Returns False where that cannot be done (not glibc, or mallopt refused)."""
    if not 0 <= value <= KEEP_ALL:
        raise ValueError(f"a trim threshold must lie in [0, {KEEP_ALL}], got {value!r}")
    lib = _glibc()
    if lib is None:
        return False
    return bool(lib.mallopt(M_MMAP_THRESHOLD, MMAP_CEILING)
                and lib.mallopt(M_TRIM_THRESHOLD, value))


@contextlib.contextmanager
def kept_heap(enabled: bool = True) -> Iterator[bool]:
    """While the block runs, keep freed heap memory in the process (see the module's
    docstring); afterwards return the free part to the kernel. Yields whether the
    heap is being kept (False where disabled or not glibc). Blocks may nest: the
    outermost one that kept the heap restores it."""
    global _depth
    kept = enabled and (_depth > 0 or set_trim_threshold(KEEP_ALL))
    _depth += kept
    try:
        yield kept
    finally:
        _depth -= kept
        lib = _glibc()
        if kept and _depth == 0 and lib is not None:
            set_trim_threshold(TRIM_SETTLED)
            lib.malloc_trim(0)
