"""Starting and stopping real processes for tests: redis-server, workers, the API.

Every process runs in its own session so the whole group can be stopped, and
every start registers its stop, so nothing outlives a failing test.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout_s: float, what: str, interval: float = 0.1):
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"{what} not ready after {timeout_s}s")


class Proc:
    """A subprocess with a log file, stopped with TERM then KILL on its whole group."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        self._log = open(self.log_path, "ab")
        full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(argv, cwd=ROOT, env=full_env, stdout=self._log,
                                      stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except FileNotFoundError:
            return ""

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
                self.popen.wait(timeout=timeout_s)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
        if self.alive():
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.popen.wait(timeout=10)
        else:  # the leader is gone; make sure no pool child lingers
            try:
                os.killpg(self.popen.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        self._log.close()


def start_redis(tmp: Path, port: int | None = None, aof: bool = False) -> tuple[Proc, str]:
    """redis-server on loopback; ``aof`` persists as ``make up`` does (AOF, fsync every second),
    and starting again with the same ``tmp`` and ``port`` brings the data back."""
    port = port or free_port()
    persistence = ["--appendonly", "yes", "--appendfsync", "everysec"] if aof else ["--appendonly", "no"]
    proc = Proc(f"redis-{port}", ["redis-server", "--port", str(port), "--bind", "127.0.0.1",
                                  "--save", "", *persistence, "--dir", str(tmp),
                                  "--protected-mode", "yes"], {}, tmp)
    import redis

    client = redis.Redis(port=port, socket_connect_timeout=0.5)

    def up():
        if not proc.alive():
            raise RuntimeError(f"redis-server exited:\n{proc.log()}")
        try:
            return client.ping()
        except redis.exceptions.ConnectionError:
            return False

    wait_until(up, 20, "redis-server")
    return proc, f"redis://127.0.0.1:{port}/0"


def start_worker(model: str, env: dict[str, str], log_dir: Path, node: str | None = None) -> Proc:
    node = node or f"worker-{model}-{os.getpid()}-{time.monotonic_ns() % 10**6}@%h"
    return Proc(node.split("@")[0], [str(VENV_BIN / "celery"), "-A", "workers", "worker", "--model", model,
                                     "--loglevel", "INFO", "--hostname", node], env, log_dir)


def worker_ready(redis_url: str, model: str, proc: Proc, timeout_s: float = 120) -> None:
    import redis

    client = redis.Redis.from_url(redis_url)

    def check():
        if not proc.alive():
            raise RuntimeError(f"worker for {model} exited:\n{proc.log()}")
        nodes = [k.decode() for k in client.hkeys(f"workers:{model}")]
        return [n for n in nodes if proc.name in n]

    wait_until(check, timeout_s, f"worker for {model}", interval=0.2)


def start_ready_worker(model: str, env: dict, log_dir: Path, redis_url: str) -> tuple[Proc, str]:
    """A worker of its own for ``model``, heartbeating; (its process, its node name)."""
    import redis

    worker = start_worker(model, env, log_dir)
    try:
        worker_ready(redis_url, model, worker)
        node = next(n.decode() for n in redis.Redis.from_url(redis_url).hkeys(f"workers:{model}")
                    if worker.name in n.decode())
    except BaseException:
        worker.stop()
        raise
    return worker, node


def start_api(env: dict[str, str], log_dir: Path, workers: int = 2) -> tuple[Proc, str]:
    """gunicorn as make up runs it (its config file: metrics across processes), on a free port."""
    port = free_port()
    env = {"METRICS_DIR": str(log_dir / "metrics"), **env}
    proc = Proc(f"api-{port}", [str(VENV_BIN / "gunicorn"), "--config", str(ROOT / "gunicorn_conf.py"),
                                "--bind", f"127.0.0.1:{port}", "--workers", str(workers),
                                "--worker-class", "gthread", "--threads", "16", "--timeout", "60",
                                "--limit-request-line", "16384", "--limit-request-field_size", "32768",
                                "wsgi:app"], env, log_dir)
    base = f"http://127.0.0.1:{port}"

    def up():
        if not proc.alive():
            raise RuntimeError(f"API exited:\n{proc.log()}")
        try:
            with urllib.request.urlopen(f"{base}/healthz", timeout=1) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    wait_until(up, 60, "API")
    return proc, base


def job_json(response) -> dict:
    return json.loads(response.read())
