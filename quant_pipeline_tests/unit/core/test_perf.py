"""glibc's malloc settings the evaluation runs under (core.perf), seen through glibc's count of mapped blocks.

Run in a fresh interpreter: glibc serves a block from a free chunk of the heap whatever the threshold, so a heap
that earlier tests have used would blur what the settings decide."""

import json
import subprocess
import sys

import pytest

SCENARIO = """
import ctypes, ctypes.util, json
from quant_pipeline.core.perf import bound_heap_fragmentation, heap_for_temporaries

libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
libc.malloc.restype, libc.malloc.argtypes, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_size_t], [ctypes.c_void_p]
FIELDS = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in FIELDS.split()]
libc.mallinfo2.restype = Mallinfo2

def mapped(size):
    before = libc.mallinfo2().hblks
    block = libc.malloc(size)
    now = libc.mallinfo2().hblks
    libc.free(block)
    return now == before + 1

seen = {"bound": bound_heap_fragmentation(), "bound_2mb": mapped(2 << 20)}
with heap_for_temporaries():
    seen |= {"within_2mb": mapped(2 << 20), "within_40mb": mapped(40 << 20)}
seen["after_2mb"] = mapped(2 << 20)
try:
    with heap_for_temporaries():
        raise RuntimeError("a failed evaluation")
except RuntimeError:
    seen["after_raise_2mb"] = mapped(2 << 20)
print(json.dumps(seen))
"""


@pytest.fixture(scope="module")
def seen() -> dict:
    import ctypes
    import ctypes.util

    if not hasattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "mallinfo2"):
        pytest.skip("needs glibc 2.33 or later (mallinfo2)")
    done = subprocess.run([sys.executable, "-c", SCENARIO], capture_output=True, text=True, check=True, timeout=120)
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_under_the_bound_a_block_of_two_megabytes_gets_a_mapping_of_its_own(seen):
    assert seen["bound"] and seen["bound_2mb"]


def test_within_heap_for_temporaries_it_comes_from_the_heap_and_only_blocks_over_32_mb_are_mapped(seen):
    assert not seen["within_2mb"]
    assert seen["within_40mb"]


def test_the_bound_comes_back_after_heap_for_temporaries_even_when_the_loop_inside_raises(seen):
    assert seen["after_2mb"]
    assert seen["after_raise_2mb"]
