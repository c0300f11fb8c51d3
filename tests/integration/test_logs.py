"""One JSON line per event: a job id followed from the API's line to the worker's."""

from __future__ import annotations

import json

from tests.procs import wait_until


def _json_lines(path) -> list[dict]:
    out = []
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


def test_a_job_is_traceable_from_api_to_worker_to_result(client, workers, stack_dir):
    job = client.run("minilm", "trace me")
    job_id = job["id"]
    api_logs = sorted(stack_dir.glob("api-*.log"))
    worker_log = workers["minilm"].log_path

    def found():
        api = [e for p in api_logs for e in _json_lines(p) if e.get("job_id") == job_id]
        lines = _json_lines(worker_log)
        work = [e for e in lines if e.get("job_id") == job_id]
        batch = [e for e in lines if work and e.get("event") == "batch.done"
                 and e.get("batch_id") == work[-1].get("batch_id")]
        return (api, work, batch) if api and work and batch else None

    api, work, batch = wait_until(found, 10, "log lines for the job and its batch")
    submitted = api[0]
    assert submitted["event"] == "job.submitted" and submitted["model"] == "minilm"
    assert submitted["level"] == "INFO" and submitted["time"]
    finished = work[-1]
    assert finished["event"] == "job.finished" and finished["status"] == "succeeded"
    assert finished["worker"] == job["worker"] and finished["run_ms"] >= 0 and finished["batch_id"]
    assert batch[0]["model"] == "minilm" and batch[0]["model_ms"] > 0
    # Celery's own lines are JSON too
    assert any(e.get("logger", "").startswith("celery") for e in _json_lines(worker_log))
