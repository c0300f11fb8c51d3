import pytest

from models.exceptions import InvalidInput, TransientError
from workers.batching import Job, execute, plan


class FakeRunner:
    """Doubles numbers; raises on 'bad' inside a batch, TransientError on 'busy'."""

    def __init__(self):
        self.calls: list[list] = []

    def preprocess(self, item):
        if item == "garbage":
            raise InvalidInput("not a number")
        return item

    def run(self, batch):
        self.calls.append(list(batch))
        if "busy" in batch:
            raise TransientError("out of memory")
        if "bad" in batch:
            raise ValueError("model blew up")
        return [x * 2 for x in batch]


def test_plan_takes_the_most_urgent_first_and_keeps_arrival_order():
    reqs = [("a", 9), ("b", 5), ("c", 0), ("d", 5), ("e", 0)]
    batch, rest = plan(reqs, 3, priority=lambda r: r[1])
    assert batch == [("c", 0), ("e", 0), ("b", 5)]
    assert rest == [("d", 5), ("a", 9)]
    weighted = [("a", 0, 3), ("b", 0, 3), ("c", 5, 1), ("d", 0, 10)]
    batch, rest = plan(weighted, 6, priority=lambda r: r[1], weight=lambda r: r[2])
    assert batch == [("a", 0, 3), ("b", 0, 3)] and rest == [("d", 0, 10), ("c", 5, 1)]
    batch, _ = plan([("huge", 0, 500)], 6, priority=lambda r: r[1], weight=lambda r: r[2])
    assert batch == [("huge", 0, 500)]  # a job larger than a batch still runs, alone
    with pytest.raises(ValueError, match="max_size must be >= 1"):
        plan(reqs, 0, priority=lambda r: r[1])


def test_one_forward_pass_for_the_whole_batch():
    runner = FakeRunner()
    out = execute(runner, [Job("1", [1]), Job("2", [2, 3], single=False)], max_items=8)
    assert [(o.status, o.result) for o in out] == [("succeeded", 2), ("succeeded", [4, 6])]
    assert runner.calls == [[1, 2, 3]]


def test_forward_passes_are_capped_at_max_items():
    runner = FakeRunner()
    out = execute(runner, [Job(str(i), [i]) for i in range(5)], max_items=2)
    assert [o.result for o in out] == [0, 2, 4, 6, 8]
    assert runner.calls == [[0, 1], [2, 3], [4]]


def test_a_poison_job_fails_alone_and_the_rest_succeed():
    runner = FakeRunner()
    jobs = [Job(str(i), [i]) for i in range(6)] + [Job("p", ["bad"])] + [Job("7", [7])]
    out = {o.job_id: o for o in execute(runner, jobs, max_items=64)}
    assert out["p"].status == "failed"
    assert out["p"].error == {"type": "ValueError", "message": "model blew up"}
    assert all(out[str(i)].status == "succeeded" and out[str(i)].result == 2 * i for i in (0, 1, 2, 3, 4, 5, 7))
    # bisection: a handful of passes, not one per job
    assert len(runner.calls) <= 1 + 2 * 3


def test_bad_preprocessing_fails_only_that_job():
    runner = FakeRunner()
    out = execute(runner, [Job("a", [1]), Job("b", ["garbage"]), Job("c", [], single=False)], max_items=8)
    assert [o.status for o in out] == ["succeeded", "failed", "failed"]
    assert out[1].error["type"] == "InvalidInput"
    assert out[2].error["message"] == "no inputs"
    assert runner.calls == [[1]]


def test_transient_errors_mark_the_group_for_retry():
    out = execute(FakeRunner(), [Job("a", [1]), Job("b", ["busy"])], max_items=8)
    assert [o.status for o in out] == ["retry", "retry"]
    assert out[0].error["type"] == "TransientError"


def test_a_runner_that_drops_results_is_caught():
    class Lossy(FakeRunner):
        def run(self, batch):
            return batch[:-1]

    out = execute(Lossy(), [Job("a", [1]), Job("b", [2])], max_items=8)
    assert [o.status for o in out] == ["failed", "failed"]
    assert "0 results for 1 inputs" in out[0].error["message"]


def test_doctests():
    import doctest

    import workers.batching

    assert doctest.testmod(workers.batching).failed == 0


def _learn(batcher, ms_by_size, rounds=3):
    for _ in range(rounds):
        for size, ms in ms_by_size.items():
            batcher.record(size, ms / 1000)


def test_adaptive_batching_learns_the_most_efficient_size_whichever_shape_the_cost_has():
    from workers.batching import AdaptiveBatcher

    text = AdaptiveBatcher(max_size=64)  # per-input cost falls all the way (MiniLM-like)
    assert text.sizes == [1, 2, 4, 8, 16, 32, 64]
    _learn(text, {1: 16, 2: 22, 4: 30, 8: 50, 16: 95, 32: 185, 64: 360})
    assert text.best() == 64 and text.target(available=500) == 64
    cnn = AdaptiveBatcher(max_size=16)  # per-input cost rises past 2 (a CNN on one core)
    _learn(cnn, {1: 30, 2: 56, 4: 130, 8: 280, 16: 600})
    assert cnn.best() == 2 and cnn.target(available=500) == 2
    even = AdaptiveBatcher(max_size=64)  # 32 a hair cheaper in the pool; a batch also costs its gap
    _learn(even, {1: 16, 2: 22, 4: 30, 8: 50, 16: 95, 32: 170, 64: 341})
    assert 170 / 32 < 341 / 64 and even.best() == 64  # (170 + 2) / 32 > (341 + 2) / 64
    odd = AdaptiveBatcher(max_size=24)
    assert odd.sizes == [1, 2, 4, 8, 16, 24] and odd.bucket(20) == 16 and odd.bucket(24) == 24 and odd.bucket(0) == 1


def test_with_a_backlog_a_size_costs_its_whole_cycle_not_the_pools_time():
    """Run M: in the pool MiniLM ran batches of 32 faster per text than 64, but each batch also
    waits outside the pool (acks, hand-off, a busy Redis), and over whole cycles 64 was faster."""
    from workers.batching import AdaptiveBatcher

    b = AdaptiveBatcher(max_size=64)
    pool_ms = {1: 16, 2: 22, 4: 30, 8: 50, 16: 95, 32: 170, 64: 350}  # 32: 5.31 ms a text, 64: 5.47
    for _ in range(3):
        for size, ms in pool_ms.items():
            b.record(size, ms / 1000, cycle=(ms + 12) / 1000)  # 12 ms a batch outside the pool
    assert b.best() == 64 and b.target(available=500) == 64  # 32: 5.69 ms a text, 64: 5.66
    assert abs(b.gap - 0.012) < 0.002  # learnt from the cycles: 2 ms at start, 12 after
    pool_only = AdaptiveBatcher(max_size=64)
    _learn(pool_only, pool_ms)  # no cycles timed: the pool's time plus the 2 ms it assumes
    assert pool_only.per_input(32) < pool_only.per_input(64) and pool_only.gap == AdaptiveBatcher.GAP_S
    b.record(1, 0.016)  # a batch started on an idle pool: its pool time plus the learnt gap
    assert abs(b.cost[1] - (0.8 * 0.028 + 0.2 * (0.016 + b.gap))) < 1e-9
    b.record(1, 0.016, cycle=0.010)  # a cycle shorter than the pool's time is not a cycle
    assert b.samples[1] == 5 and 0.010 < b.gap < 0.014


def test_sizes_within_a_twentieth_of_the_cheapest_are_tied_and_the_largest_is_taken():
    """In the system MiniLM ran batches of 64 faster than 32 although 32 timed a little cheaper."""
    from workers.batching import AdaptiveBatcher

    b = AdaptiveBatcher(max_size=64)
    _learn(b, {1: 15, 2: 16, 4: 22, 8: 29, 16: 57, 32: 75.5, 64: 153.5})  # 32: 2.36 ms a text, 64: 2.40
    assert b.per_input(32) < b.per_input(64) and b.best() == 64
    cnn = AdaptiveBatcher(max_size=16)
    _learn(cnn, {1: 20, 2: 40.5, 4: 92, 8: 200, 16: 520})  # 1 within 5% of 2, 4 beyond it
    assert cnn.best() == 2


def test_a_batch_between_sizes_teaches_no_sizes_cost():
    """In a harness round after run O, a burst's tail (batches of 40 to 60 texts) counted as
    32's made 32 look as cheap per text as those bigger batches are, and the next backlog ran in
    batches of 32 (43.3 on average in that round, 59.1 in the others). A batch near a size counts
    for it; one between, for none."""
    from workers.batching import AdaptiveBatcher

    b = AdaptiveBatcher(max_size=64)
    per_text_ms = {1: 15.0, 2: 8.2, 4: 5.6, 8: 3.6, 16: 3.55, 32: 2.6, 64: 2.37}
    for _ in range(3):
        for size, ms in per_text_ms.items():
            b.record(size, size * ms / 1000, cycle=size * ms / 1000 + 0.004)
    assert b.best() == 64
    learnt, gap = dict(b.cost), b.gap
    for inputs in (40, 44, 48, 52):  # between 32 and 64, cheaper per text than 32
        b.record(inputs, inputs * 0.0022, cycle=inputs * 0.0022 + 0.008)
    assert b.cost == learnt and b.best() == 64
    assert b.gap > gap  # the time outside the pool still counts, whatever the size
    b.record(60, 60 * 0.0022, cycle=60 * 0.0022 + 0.004)  # within an eighth of 64: 64's
    assert b.cost[64] < learnt[64] and b.samples[64] == 4 and b.cost[32] == learnt[32]
    b.record(30, 30 * 0.003)  # and 30 is 32's
    assert b.samples[32] == 4 and b.cost[32] != learnt[32]


def test_adaptive_batching_tries_each_size_the_backlog_fills_then_neighbours_now_and_then():
    from workers.batching import AdaptiveBatcher

    b = AdaptiveBatcher(max_size=8)
    seen = []
    for _ in range(12):  # a long backlog: 1, 1, 1, 2, 2, 2, 4, ... each size learnt MIN_SAMPLES times
        size = b.target(available=100)
        seen.append(size)
        b.record(size, {1: 0.010, 2: 0.012, 4: 0.016, 8: 0.040}[size])
    assert seen == [1] * 3 + [2] * 3 + [4] * 3 + [8] * 3
    assert b.target(available=3) == 4  # a cap: the batch takes the 3 there are
    tried = []
    for _ in range(2 * b.EXPLORE_EVERY):
        size = b.target(available=100)
        tried.append(size)
        b.record(size, {2: 0.012, 4: 0.016, 8: 0.040}[size])
    assert tried.count(4) >= 2 * b.EXPLORE_EVERY - 2 and {2, 8} <= set(tried)  # mostly the best, neighbours too
    with pytest.raises(ValueError):
        AdaptiveBatcher(max_size=0)


def test_adaptive_batching_waits_only_when_arrivals_outpace_the_batch_size_at_hand():
    from workers.batching import AdaptiveBatcher

    b = AdaptiveBatcher(max_size=64)
    _learn(b, {1: 16, 2: 22, 4: 30, 8: 50, 16: 95, 32: 185, 64: 360})  # 62 items/s at 1, 133 at 4
    assert not b.should_wait(1, now=0.0)  # no arrivals seen yet
    for i in range(50):  # 20 jobs/s: batches of 1 keep up
        b.arrived(i * 0.05)
    assert 19 < b.arrival_rate(2.45) < 21 and not b.should_wait(1, now=2.45)
    for i in range(100):  # then 100 jobs/s: batches of 1 (62/s) or 2 (91/s) fall behind, 4 keeps up
        b.arrived(2.5 + i * 0.01)
    now = 2.5 + 99 * 0.01
    assert b.should_wait(1, now) and b.should_wait(2, now) and not b.should_wait(4, now)
    assert not b.should_wait(1, now + 1.0)  # a quiet second: idle again, no waiting
    assert b.arrival_rate(now + 1.0) <= 1.0
    two = AdaptiveBatcher(max_size=64, processes=2)  # two processes serve twice as fast
    _learn(two, {1: 16, 2: 22, 4: 30, 8: 50, 16: 95, 32: 185, 64: 360})
    for i in range(100):
        two.arrived(i * 0.01)
    assert not two.should_wait(1, 0.99)


def test_adaptive_batching_stops_trying_bigger_sizes_once_one_costs_more_per_input():
    from workers.batching import AdaptiveBatcher

    b = AdaptiveBatcher(max_size=64)
    cost_ms = {1: 30, 2: 70, 4: 150, 8: 320, 16: 700, 32: 1500, 64: 3200}  # a CNN: batch 1 is best
    seen = []
    for _ in range(10):
        size = b.target(available=1000)
        seen.append(size)
        b.record(size, cost_ms[size] / 1000)
    assert seen == [1, 1, 1, 2, 2, 2, 1, 1, 1, 1]  # 2 costs more per image: 4..64 are never tried


def test_a_high_priority_arrival_keeps_batches_short_for_a_while():
    from workers.batching import AdaptiveBatcher

    b = AdaptiveBatcher(max_size=64)
    _learn(b, {1: 16, 2: 22, 4: 30, 8: 50, 16: 95, 32: 185, 64: 360})
    assert b.target(500, now=10.0) == 64 and b.urgent_cap() == 2  # 22 ms <= 1.5 x 16 ms < 30 ms
    b.arrived(10.0, priority=5)
    assert b.target(500, now=10.1) == 64
    b.arrived(10.2, priority=0)  # high
    assert b.target(500, now=10.3) == 2 and not b.should_wait(1, now=10.3)
    assert b.target(500, now=10.2 + b.URGENT_FOR_S + 0.01) == 64  # it wears off


def test_a_new_size_limit_keeps_what_was_learnt_of_the_sizes_both_limits_allow():
    from workers.batching import AdaptiveBatcher

    b = AdaptiveBatcher(max_size=64)
    for size, ms in [(1, 10), (2, 12), (4, 16), (8, 24), (16, 40), (32, 72), (64, 136)] * 3:
        b.record(size, ms / 1000)
    assert b.best() == 64
    b.record(64, 0.136, cycle=0.146)  # a backlog cycle: 10 ms outside the pool
    smaller = b.resized(16)
    assert smaller.gap == b.gap > b.GAP_S  # what a batch costs outside the pool does not depend on the limit
    assert smaller.sizes == [1, 2, 4, 8, 16]
    assert smaller.cost == {s: b.cost[s] for s in smaller.sizes} and smaller.best() == 16
    assert smaller.target(available=100) == 16  # no relearning of sizes it has measured
    bigger = smaller.resized(128)
    assert bigger.samples[128] == 0
    # 32 and 64, learnt under the first limit, are back: only 128 is new, and tried first
    assert bigger.cost[32] == b.cost[32] and bigger.samples[64] == b.samples[64] == 4
    assert bigger.target(available=200) == 128


def test_switching_to_a_small_fixed_limit_and_back_does_not_relearn_the_larger_sizes():
    """``make bench`` (and an operator) switches a worker to fixed 4 and back to adaptive 16: the
    batcher used to forget 8 and 16 on the way down and spend its next batches relearning them."""
    from workers.batching import AdaptiveBatcher

    b = AdaptiveBatcher(max_size=16)
    for size, ms in [(1, 50), (2, 84), (4, 144), (8, 360), (16, 800)] * 3:  # a CNN: 4 is the cheapest per image
        b.record(size, ms / 1000)
    assert b.best() == 4
    back = b.resized(4).resized(16)
    assert back.cost == b.cost and back.samples == b.samples
    assert [back.target(available=100) for _ in range(10)] == [4] * 10
    assert AdaptiveBatcher(16).target(available=100) == 1  # (a new one learns from the smallest size)
