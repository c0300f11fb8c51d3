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
