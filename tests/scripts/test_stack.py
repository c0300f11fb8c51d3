"""make up / make down, for real: scripts/stack.py on free ports with its own var dir."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.procs import ROOT, free_port, wait_until


def free_pair() -> int:
    """A free port whose next two are free too (make up gives each worker one, in order)."""
    for _ in range(50):
        port = free_port()
        if port < 65000 and all(_free(port + i) for i in (1, 2)):
            return port
    raise RuntimeError("no three free ports in a row")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


@pytest.fixture
def stack(tmp_path):
    env = {**os.environ, "VAR_DIR": str(tmp_path / "var"), "API_PORT": str(free_port()),
           "FLOWER_PORT": str(free_port()), "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "MODELS": "minilm,sentiment", "TORCH_THREADS": "1", "FLOWER_BASIC_AUTH": "ops:s3cret",
           "WORKER_METRICS_PORT": str(free_pair())}

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

    # each worker serves its metrics; var/prometheus.yml scrapes the API and every worker
    first_port = int(env["WORKER_METRICS_PORT"])
    assert f"minilm :{first_port}" in first.stdout and f"sentiment :{first_port + 1}" in first.stdout
    scrape = json.loads(open(os.path.join(env["VAR_DIR"], "prometheus.yml")).read().split("\n", 1)[1])
    targets = {t for job in scrape["scrape_configs"] for c in job["static_configs"] for t in c["targets"]}
    assert targets == {f"127.0.0.1:{env['API_PORT']}", f"127.0.0.1:{first_port}", f"127.0.0.1:{first_port + 1}"}
    text = requests.get(f"http://127.0.0.1:{first_port}/metrics", timeout=10).text
    assert re.search(r'worker_jobs_total\{model="minilm",priority="normal",status="succeeded"\} [1-9]', text)
    assert re.search(r'model_load_seconds\{device="cpu",model="minilm"\} \d', text)
    assert 'api_request_seconds_count{method="POST",route="/jobs",status="202"}' in \
        requests.get(f"{api}/metrics", timeout=10).text

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

    # adding a model starts its worker and restarts the API and Flower (both list the models);
    # Redis and the other workers stay
    before = supervised(env)
    grown = run("up", "--no-warmup", extra={"API_KEYS": "k9", "MODELS": "minilm,sentiment,efficientnet-lite0"})
    assert grown.returncode == 0, grown.stdout + grown.stderr
    after = supervised(env)
    assert after["worker-efficientnet-lite0"][0] == "RUNNING" and after["flower"][0] == "RUNNING"
    for name in ("redis", "worker-minilm", "worker-sentiment"):
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


def test_every_setting_in_the_readme_reaches_the_programs_make_up_starts():
    """supervisord starts the API and workers with only the environment stack.py gives them: a
    setting the README lists must be forwarded, or set by stack.py itself."""
    import importlib.util

    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Configuration"):readme.index("## Operations")]
    names = {n for pair in re.findall(r"^\| `([A-Z_]+)`(?:, `([A-Z_]+)`)?", table, re.M) for n in pair if n}
    spec = importlib.util.spec_from_file_location("stack_script", ROOT / "scripts" / "stack.py")
    stack_script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stack_script)
    # what stack.py (less the FORWARDED list itself) and bootstrap.sh read or set by name
    source = re.sub(r"FORWARDED = \(.*?\n\)", "", (ROOT / "scripts" / "stack.py").read_text(), flags=re.S)
    source += (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert "URGENT_LANE" in names and len(names) > 20
    missing = sorted(n for n in names if n not in stack_script.FORWARDED and not re.search(rf"\b{n}\b", source))
    assert not missing, f"README settings that make up's programs never see: {missing}"


def test_a_setting_out_of_range_is_refused_in_one_line_before_anything_starts(tmp_path):
    out = subprocess.run([sys.executable, "scripts/stack.py", "up"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60, env={**os.environ, "KEEP_FREED_MEMORY": "2", "VAR_DIR": str(tmp_path / "var")})
    assert out.returncode == 1
    assert out.stderr.strip() == "error: KEEP_FREED_MEMORY must be 0 or 1, got 2", out.stderr[-2000:]
    assert not (tmp_path / "var").exists()  # nothing written, nothing started
