"""make up / make down, for real: scripts/stack.py on free ports with its own var dir."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.procs import ROOT, free_port, wait_until


@pytest.fixture
def stack(tmp_path):
    env = {**os.environ, "VAR_DIR": str(tmp_path / "var"), "API_PORT": str(free_port()),
           "FLOWER_PORT": str(free_port()), "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "MODELS": "minilm,sentiment", "TORCH_THREADS": "1", "FLOWER_BASIC_AUTH": "ops:s3cret"}

    def run(*args, timeout=400, extra=None):
        return subprocess.run([sys.executable, "scripts/stack.py", *args], cwd=ROOT, env={**env, **(extra or {})},
                              capture_output=True, text=True, timeout=timeout)

    try:
        yield env, run
    finally:
        run("down", timeout=120)


def supervised(env):
    conf = os.path.join(env["VAR_DIR"], "supervisord.conf")
    out = subprocess.run([os.path.join(os.path.dirname(sys.executable), "supervisorctl"), "-c", conf, "status"],
                         capture_output=True, text=True).stdout
    return {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.strip()}


def test_up_is_idempotent_restarts_crashes_and_down_stops_everything(stack):
    env, run = stack
    api = f"http://127.0.0.1:{env['API_PORT']}"
    first = run("up")
    assert first.returncode == 0, first.stdout + first.stderr
    assert "The system is up." in first.stdout and "login ops:s3cret" in first.stdout
    assert "minilm" in first.stdout and "ok in" in first.stdout

    job = requests.post(f"{api}/jobs", json={"model": "sentiment", "input": "I love this, it works great"},
                        timeout=10).json()
    done = requests.get(f"{api}/jobs/{job['id']}", params={"wait": 20}, timeout=30).json()
    assert done["result"]["label"] == "POSITIVE"

    flower = f"http://127.0.0.1:{env['FLOWER_PORT']}/api/workers"
    assert requests.get(flower, timeout=10).status_code == 401
    assert requests.get(flower, auth=("ops", "s3cret"), timeout=10).status_code == 200

    again = run("up")
    assert again.returncode == 0 and "already running" in again.stdout, again.stdout + again.stderr
    status = supervised(env)
    assert set(status) == {"redis", "api", "worker-minilm", "worker-sentiment", "flower"}
    assert all(fields[0] == "RUNNING" for fields in status.values()), status

    # a crashed worker is restarted by the supervisor and serves again
    pid = int(status["worker-minilm"][2].rstrip(","))
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: (s := supervised(env).get("worker-minilm")) and s[0] == "RUNNING"
               and int(s[2].rstrip(",")) != pid, 60, "restarted worker")
    job = requests.post(f"{api}/jobs", json={"model": "minilm", "input": "after the crash"}, timeout=10).json()
    done = requests.get(f"{api}/jobs/{job['id']}", params={"wait": 30}, timeout=40).json()
    assert done["status"] == "succeeded", done

    # changed settings on a second `up` restart what they affect: here the API, now with keys
    keyed = run("up", "--no-warmup", extra={"API_KEYS": "k9"})
    assert keyed.returncode == 0, keyed.stdout + keyed.stderr
    assert requests.get(f"{api}/models", timeout=10).status_code == 401
    assert requests.get(f"{api}/models", headers={"X-API-Key": "k9"}, timeout=10).status_code == 200

    # adding a model starts its worker and restarts the API; Redis, Flower and the other workers stay
    before = supervised(env)
    grown = run("up", "--no-warmup", extra={"API_KEYS": "k9", "MODELS": "minilm,sentiment,efficientnet-lite0"})
    assert grown.returncode == 0, grown.stdout + grown.stderr
    after = supervised(env)
    assert after["worker-efficientnet-lite0"][0] == "RUNNING"
    for name in ("redis", "flower", "worker-minilm", "worker-sentiment"):
        assert after[name][2] == before[name][2], (name, before[name], after[name])  # same pid

    redis_conf = open(os.path.join(env["VAR_DIR"], "redis.conf")).read()
    assert "appendonly yes" in redis_conf and "bind 127.0.0.1" in redis_conf

    down = run("down", timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{api}/healthz", timeout=2)
    assert "RUNNING" not in json.dumps(supervised(env))
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{env['FLOWER_PORT']}/", timeout=2)
