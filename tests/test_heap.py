"""Freed CPU memory kept in the process while training (s2h_fx.heap): memory freed
and allocated again inside a kept block faults no page in, the same outside one
does, nested blocks restore once, and the loop keeps the heap on the CPU only
when asked. (What it gains on an S2H step: benchmarks/overhead.py, which counts
each step's page faults with the heap kept and, with --no-keep-heap, without.)"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import s2h_fx.heap
import s2h_fx.loop
from s2h_fx.trainer import fit_dense

heap = s2h_fx.heap
glibc = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the heap's trim threshold is glibc's (mallopt); elsewhere kept_heap does nothing")

HEAP_PY = Path(s2h_fx.heap.__file__)

# Run in a fresh interpreter (standard library only): whether freed blocks reach the
# heap's top, and so whether glibc trims them, depends on what else the heap holds,
# which a test process that has run others does not fix.
SCRIPT = r"""
import ctypes, importlib.util, json, resource, sys
spec = importlib.util.spec_from_file_location("heap", sys.argv[1])
heap = importlib.util.module_from_spec(spec)
spec.loader.exec_module(heap)
BLOCK, BLOCKS = 4 << 20, 64  # 256 MiB in heap blocks (below the 32 MiB mmap threshold)
libc = heap._glibc()
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def minflt():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt

def fill():
    blocks = [libc.malloc(BLOCK) for _ in range(BLOCKS)]
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, BLOCK)
    return blocks

def free(blocks):
    for b in reversed(blocks):  # last first: they merge into the heap's top
        libc.free(b)

def faults_of_reallocating():
    free(fill())
    before = minflt()
    blocks = fill()
    faults = minflt() - before
    free(blocks)
    return faults

out = {}
assert heap.set_trim_threshold(heap.TRIM_SETTLED)  # glibc's settled default
out["settled"] = faults_of_reallocating()
with heap.kept_heap() as kept:
    assert kept
    faults_of_reallocating()  # the heap grows to hold it once
    out["kept"] = faults_of_reallocating()
    with heap.kept_heap() as inner:
        assert inner
    out["kept after a nested block"] = faults_of_reallocating()
out["restored"] = faults_of_reallocating()
print(json.dumps(out))
"""


@glibc
def test_a_kept_heap_faults_nothing_in_again() -> None:
    """256 MiB malloc'ed in 4 MiB blocks, freed and malloc'ed again: at glibc's
    settled thresholds the heap's top is trimmed (64 MiB at a time) and faulted in
    again; inside a kept block nothing is, also after a nested block ends; on
    leaving, the settled thresholds are back."""
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(HEAP_PY)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    faults = json.loads(done.stdout)
    pages = (4 << 20) * 64 // 4096
    assert faults["settled"] > pages // 4, faults
    assert faults["kept"] < pages // 20, faults
    assert faults["kept after a nested block"] < pages // 20, faults
    assert faults["restored"] > pages // 4, faults


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
