"""workers.lane: batches of other than high-priority jobs run in a thread at the lowest CPU priority."""

import os
import threading

import pytest

from workers import lane


def test_in_background_runs_in_one_low_priority_thread_and_returns_or_raises():
    def where():
        tid = threading.get_native_id()
        return tid, os.getpriority(os.PRIO_PROCESS, tid)

    main_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    tid, nice = lane.in_background(where)
    assert tid != threading.get_native_id() and nice == lane.BULK_NICE
    assert lane.in_background(where)[0] == tid  # the same thread each time
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_nice  # the caller's is unchanged

    def boom():
        raise ValueError("from the batch")

    with pytest.raises(ValueError, match="from the batch"):
        lane.in_background(boom)
