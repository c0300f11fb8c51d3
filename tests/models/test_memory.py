"""``keep_freed_memory``: a model's batches stop faulting their memory in again each time."""

import subprocess
import sys

import pytest

from settings import ROOT

#: What a batch of tensors does to glibc's heap, made deterministic: a large block freed (glibc then
#: moves its thresholds: blocks below 20 MiB come from the heap, and a free top of the heap above
#: 40 MiB goes back to the kernel), then "batches" of 100 MiB in 2 MiB blocks, written and freed.
#: In a thread (the urgent lane runs batches in one) the blocks come from the thread's arena, in
#: heaps of 64 MiB, and a second heap left empty is unmapped whatever the trim threshold says.
#: Larger blocks (argv 3: MiB a block) are mapped by themselves whatever the thresholds, unless
#: nothing may be: above 32 MiB (glibc's largest threshold) in any thread, above 64 MiB (a heap) in
#: a thread's own arena. Prints the minor page faults per batch. (MiniLM's batches of 64 faulted
#: about 12,000 pages each; efficientnet-lite0's batches of 4 in a thread about 30,000, of 16 about
#: 114,000.)
PATTERN = """
import ctypes, resource, sys
from models.base import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MB = 1 << 20
SIZE = int(sys.argv[3]) * MB
def batch():
    blocks = [libc.malloc(SIZE) for _ in range(max(1, 100 * MB // SIZE))]
    for block in blocks:
        ctypes.memset(block, 1, SIZE)
    for block in reversed(blocks):
        libc.free(block)
def run():
    if SIZE < 20 * MB:  # (a larger first block would leave the heap's top room enough for the big ones)
        libc.free(libc.malloc(20 * MB))
    batch()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        batch()
    print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10)
if sys.argv[2] == "thread":  # the urgent lane's batch thread: an arena of its own, in 64 MiB heaps
    import threading
    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
else:
    run()
"""


def faults(mode: str, where: str, block_mib: int) -> float:
    out = subprocess.run([sys.executable, "-c", PATTERN, mode, where, str(block_mib)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("where", ["main", "thread"])
@pytest.mark.parametrize("block_mib", [2, 40, 80])  # on the heap; above the largest threshold; above a heap
def test_kept_memory_is_not_faulted_in_again_each_batch(where, block_mib):
    default, kept = faults("default", where, block_mib), faults("keep", where, block_mib)
    # 100 MiB of 4 KiB pages is 25,600 faults; glibc keeps some (the first heap in a thread)
    assert default > 5000, f"glibc's defaults faulted only {default} pages a batch: the pattern shows nothing"
    assert kept < 100, (default, kept)


#: A worker's main process runs threads (Celery's), then forks its pool processes, whose batch thread
#: runs the model. A thread that allocated before the fork has an arena of its own, the child keeps
#: it (glibc puts it on the free list), and a thread started in the child takes it whatever the
#: arena limit set there: large blocks are then mapped afresh each batch (efficientnet-lite0's
#: batches of 16: about 7,000 faults a job, 25 images/s against 37). Set in the parent before its
#: threads, the limit holds in the child too. argv 1: where ``keep_freed_memory`` is called.
FORK_PATTERN = """
import ctypes, os, resource, sys, threading
from models.base import keep_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
MB = 1 << 20
def batch():
    blocks = [libc.malloc(80 * MB)]
    ctypes.memset(blocks[0], 1, 80 * MB)
    libc.free(blocks[0])
def run(out):
    batch()
    before = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
    for _ in range(10):
        batch()
    out.append((resource.getrusage(resource.RUSAGE_THREAD).ru_minflt - before) / 10)
if sys.argv[1] == "parent":
    assert keep_freed_memory()
started, done = threading.Event(), threading.Event()
def celery_thread():
    libc.free(libc.malloc(1000))
    started.set()
    done.wait(10)
threading.Thread(target=celery_thread).start()
started.wait(10)
read, write = os.pipe()
pid = os.fork()
if pid == 0:
    if sys.argv[1] == "child":
        assert keep_freed_memory()
    out = []
    thread = threading.Thread(target=run, args=(out,))  # the pool process's batch thread
    thread.start()
    thread.join()
    os.write(write, str(out[0]).encode())
    os._exit(0)
os.waitpid(pid, 0)
done.set()
print(os.read(read, 100).decode())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_in_the_parent_before_its_threads_holds_in_a_forked_child():
    def faults_when(where: str) -> float:
        out = subprocess.run([sys.executable, "-c", FORK_PATTERN, where], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        return float(out.stdout.strip().splitlines()[-1])

    only_in_child, in_parent = faults_when("child"), faults_when("parent")
    # 80 MiB of 4 KiB pages is 20,480 faults
    assert only_in_child > 5000, f"set only in the child, {only_in_child} faults a batch: the pattern shows nothing"
    assert in_parent < 100, (only_in_child, in_parent)
