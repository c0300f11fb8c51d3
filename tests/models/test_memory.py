"""``keep_freed_memory``: a model's batches stop faulting their memory in again each time."""

import subprocess
import sys

import pytest

from settings import ROOT

#: What a batch of tensors does to glibc's heap, made deterministic: a large block freed (glibc then
#: moves its thresholds: blocks below 20 MiB come from the heap, and a free top of the heap above
#: 40 MiB goes back to the kernel), then "batches" of 60 MiB in 2 MiB blocks, written and freed.
#: Prints the minor page faults per batch. (MiniLM's batches of 64 faulted about 12,000 pages each.)
PATTERN = """
import ctypes, resource, sys
from models.base import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MB = 1 << 20
def batch():
    blocks = [libc.malloc(2 * MB) for _ in range(30)]
    for block in blocks:
        ctypes.memset(block, 1, 2 * MB)
    for block in reversed(blocks):
        libc.free(block)
libc.free(libc.malloc(20 * MB))
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    batch()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
"""


def faults(mode: str) -> float:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_memory_is_not_faulted_in_again_each_batch():
    default, kept = faults("default"), faults("keep")
    # 60 MiB of 4 KiB pages is 15,360 faults; glibc keeps some of the top (its padding)
    assert default > 5000, f"glibc's defaults faulted only {default} pages a batch: the pattern shows nothing"
    assert kept < 100, (default, kept)
