"""Freed CPU memory kept in the process while training (s2h_fx.heap): memory freed
and allocated again inside a kept block faults no page in, the same outside one
does, nested blocks restore once, and the loop keeps the heap on the CPU only
when asked. (What it gains on an S2H step: benchmarks/overhead.py, which counts
each step's page faults with the heap kept and, with --no-keep-heap, without.)"""

from __future__ import annotations

import ctypes
import platform

import pytest
import torch

import s2h_fx.heap as heap
import s2h_fx.loop
from s2h_fx.trainer import fit_dense

resource = pytest.importorskip("resource", reason="minor page faults need getrusage (Unix)")
glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the heap's trim threshold is glibc's (mallopt); elsewhere kept_heap does nothing")

BLOCK, BLOCKS = 4 << 20, 64  # 256 MiB in heap blocks (below the 32 MiB mmap threshold)


def _minflt() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def _faults_of_reallocating() -> int:
    """malloc 256 MiB in 4 MiB blocks and touch them, free them (last first: they
    merge into the heap's top), do it again: the minor page faults of the second
    round. Raw malloc, so that no small allocation sits between the blocks."""
    libc = heap._glibc()
    assert libc is not None
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]

    def fill() -> list[int]:
        blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
        assert all(blocks)
        for b in blocks:
            ctypes.memset(b, 1, BLOCK)
        return blocks

    def free(blocks: list[int]) -> None:
        for b in reversed(blocks):
            libc.free(b)

    free(fill())
    before = _minflt()
    blocks = fill()
    faults = _minflt() - before
    free(blocks)
    return faults


@glibc
def test_a_kept_heap_faults_nothing_in_again() -> None:
    assert heap.set_trim_threshold(heap.TRIM_SETTLED)  # glibc's settled default
    pages = BLOCK * BLOCKS // 4096
    assert _faults_of_reallocating() > pages // 4  # trimmed (64 MiB at a time): faulted in again
    with heap.kept_heap() as kept:
        assert kept
        _faults_of_reallocating()  # the heap grows to hold it once
        assert _faults_of_reallocating() < pages // 20
        with heap.kept_heap() as inner:  # nested: the outer block still keeps it after
            assert inner
        assert _faults_of_reallocating() < pages // 20
    assert _faults_of_reallocating() > pages // 4  # restored on leaving


def test_a_disabled_block_keeps_nothing() -> None:
    with heap.kept_heap(False) as kept:
        assert kept is False
    with pytest.raises(ValueError, match="trim threshold"):
        heap.set_trim_threshold(-1)


@pytest.mark.parametrize("keep", [True, False])
def test_the_loop_keeps_the_heap_on_the_cpu_when_asked(monkeypatch, keep: bool) -> None:
    asked: list[bool] = []
    real = heap.kept_heap

    def spy(enabled: bool = True):
        asked.append(enabled)
        return real(enabled)

    monkeypatch.setattr(s2h_fx.loop, "kept_heap", spy)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3))
    data = [(torch.randn(4, 3, 2, 2), torch.randint(0, 3, (4,))) for _ in range(3)]
    fit_dense(model, data, 2, keep_heap=keep)
    assert asked == [keep, keep]  # once per epoch
