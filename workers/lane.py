"""The pool's side of the urgent lane: batches without a ``high`` job run at the lowest CPU priority.

A worker with a lane (``URGENT_LANE``, on by default) has one pool process more than batches of
``normal`` and ``low`` jobs may use; the main process sends ``high`` jobs, by themselves, to a free
process as they arrive (``workers.consumer``). On a CPU both processes share the model's cores, so
the ``high`` batch would still run at half speed beside a long batch of others. Here each pool
process runs the other batches in a thread of its own at nice 19 (Linux sets the nice value per
thread), and ``high`` batches in its main thread at the worker's own: the scheduler gives the
``high`` batch nearly all of the cores until it is done (CFS weighs nice 0 against 19 as 1024 to
15), and the long batch goes on where it was. Batches cannot be preempted; processes can.

An unprivileged process can raise its nice value but never lower it again, hence the thread.
Torch's intra-op threads (``TORCH_THREADS`` above 1) are started by the thread that first runs
the model and keep its nice value; on one thread per process, as ``make bench`` runs, the model runs
in the calling thread.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

log = logging.getLogger(__name__)

#: The nice value other batches run at, beside a ``high`` batch (19: the lowest CPU priority).
BULK_NICE = 19

_executor: ThreadPoolExecutor | None = None
_executor_pid: int | None = None


def _lower_priority() -> None:
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), BULK_NICE)  # this thread (Linux)
    except (AttributeError, OSError) as exc:  # elsewhere: they run at the same priority
        log.warning("could not lower the CPU priority of the batch thread: %s", exc)


def in_background(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` in this process's low-priority batch thread; its result, or its exception."""
    global _executor, _executor_pid
    if _executor is None or _executor_pid != os.getpid():  # (one per pool process, made after the fork)
        _executor = ThreadPoolExecutor(1, thread_name_prefix="bulk-batch", initializer=_lower_priority)
        _executor_pid = os.getpid()
    return _executor.submit(fn, *args).result()
