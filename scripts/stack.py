"""make up / make down: the whole system under supervisord on this host.

``up`` writes var/supervisord.conf (Redis with AOF, the API under gunicorn,
one Celery worker per served model, Flower), starts or updates supervisord,
waits until every part answers, runs one warm-up job per model, and prints
where everything is. It is idempotent: run it again and it only starts what
is missing or changed. ``down`` stops everything.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

try:
    import celeryconfig  # noqa: E402
    import settings  # noqa: E402
except ValueError as exc:  # a setting out of its range (settings.py says which): before anything starts
    sys.exit(f"error: {exc}")
from models.registry import Registry  # noqa: E402

VENV_BIN = ROOT / ".venv" / "bin"
VAR = Path(settings.VAR_DIR)
LOGS = VAR / "log"
CONF = VAR / "supervisord.conf"
SOCK = VAR / "supervisor.sock"


def say(msg: str) -> None:
    print(f"==> {msg}", flush=True)


def flower_credential() -> str:
    if settings.FLOWER_BASIC_AUTH:
        return settings.FLOWER_BASIC_AUTH
    path = VAR / "flower-credentials"
    if not path.exists():
        path.write_text(f"admin:{secrets.token_urlsafe(12)}\n")
        path.chmod(0o600)
    return path.read_text().strip()


def local_redis() -> tuple[str, int, str | None] | None:
    """(host, port, password) when the broker is a Redis on this host that we should run."""
    url = urlparse(celeryconfig.broker_url)
    if url.scheme != "redis" or url.hostname not in ("127.0.0.1", "localhost"):
        return None
    return url.hostname, url.port or 6379, url.password


#: Settings read by the API and workers: passed through to every process when set, so that
#: `VAR=... make up` on a running system restarts exactly the programs whose settings changed.
FORWARDED = (
    "API_KEYS", "MAX_BODY_BYTES", "MAX_TEXT_CHARS", "MAX_INPUTS", "MAX_IMAGE_PIXELS", "MAX_QUEUED",
    "JOB_TTL_S", "MAX_DELIVERIES", "MAX_RETRIES", "TORCH_THREADS", "DEVICE", "VISIBILITY_TIMEOUT_S",
    "WORKER_CONCURRENCY", "TORCH_HOME", "HF_HOME", "HF_HUB_OFFLINE", "CUDA_VISIBLE_DEVICES",
    "FAULT_CRASH_PROBABILITY", "FAULT_DELAY_MS", "LOST_MESSAGE_AFTER_S", "LOST_SWEEP_EVERY_S", "LOG_FORMAT",
    "METRICS_DIR", "WORKER_METRICS_HOST", "TASK_SENT_EVENTS", "URGENT_LANE", "KEEP_FREED_MEMORY",
)


def metrics_ports(registry: Registry) -> dict[str, int]:
    """Each worker's /metrics port: WORKER_METRICS_PORT (default 9410), then one up per model."""
    first = settings.WORKER_METRICS_PORT or 9410
    return {spec.name: first + i for i, spec in enumerate(registry)}


def _quote(name: str, value: str) -> str:
    if '"' in value or "\n" in value:
        sys.exit(f"error: {name} contains a double quote or a newline, which supervisord cannot pass on")
    return '"' + value.replace("%", "%%") + '"'


def _environment(env: dict[str, str]) -> str:
    return ",".join(f"{k}={_quote(k, v)}" for k, v in env.items())


def render(registry: Registry, credential: str) -> None:
    """Each program gets only the settings it reads, so that changing one (adding a model, say)
    restarts only the programs it affects when `make up` runs again."""
    common = {
        "PYTHONPATH": str(ROOT), "REDIS_URL": celeryconfig.broker_url,
        "BROKER_URL": celeryconfig.broker_url, "RESULT_BACKEND": celeryconfig.result_backend,
        "VAR_DIR": str(VAR), "TOKENIZERS_PARALLELISM": "false",
        **{name: os.environ[name] for name in FORWARDED if name in os.environ},
    }
    served = registry.names()
    threads = str(settings.TORCH_THREADS or max(1, (os.cpu_count() or 1) // max(1, len(served))))
    programs = []  # (name, command, priority, stop wait, environment)
    redis = local_redis()
    if redis:
        host, port, password = redis
        (VAR / "redis").mkdir(parents=True, exist_ok=True)
        lines = [f"port {port}", "bind 127.0.0.1 -::1", "protected-mode yes", f"dir {VAR / 'redis'}",
                 "appendonly yes", "appendfsync everysec", 'save ""', "maxmemory-policy noeviction",
                 "daemonize no", 'logfile ""']
        if password:
            lines.append(f"requirepass {password}")
        (VAR / "redis.conf").write_text("\n".join(lines) + "\n")
        programs.append(("redis", f"redis-server {VAR / 'redis.conf'}", 10, 10, {}))
    cmds = commands(served, f"{VENV_BIN}/", f"{settings.API_HOST}:{settings.API_PORT}",
                    settings.API_WORKERS, settings.API_THREADS, f"{ROOT}/")
    programs.append(("api", cmds["api"], 20, 30,
                     {**common, "MODELS_FILE": settings.MODELS_FILE, "MODELS": ",".join(served)}))
    ports = metrics_ports(registry)
    for spec in registry:
        entry = hashlib.sha256(repr(spec).encode()).hexdigest()[:16]  # restart when the entry changes
        programs.append((f"worker-{spec.name}", cmds[f"worker-{spec.name}"], 30, 60,
                         {**common, "MODELS_FILE": settings.MODELS_FILE, "MODELS": spec.name,
                          "TORCH_THREADS": threads, "MODEL_ENTRY_SHA": entry,
                          "WORKER_METRICS_PORT": str(ports[spec.name])}))
    programs.append(("flower", cmds["flower"], 40, 10,
                     {**common, "MODELS_FILE": settings.MODELS_FILE, "MODELS": ",".join(served),
                      "FLOWER_BASIC_AUTH": credential, "FLOWER_HOST": settings.FLOWER_HOST,
                      "FLOWER_PORT": str(settings.FLOWER_PORT)}))
    out = [
        "[unix_http_server]", f"file={SOCK}", "chmod=0700", "",
        "[supervisord]", f"logfile={LOGS / 'supervisord.log'}", f"pidfile={VAR / 'supervisord.pid'}",
        f"directory={ROOT}", "", "[rpcinterface:supervisor]",
        "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface", "",
        "[supervisorctl]", f"serverurl=unix://{SOCK}", "",
    ]
    for name, command, priority, stopwait, env in programs:
        out += [f"[program:{name}]", f"command={command.replace('%', '%%')}", f"directory={ROOT}", f"priority={priority}",
                *([f"environment={_environment(env)}"] if env else []), "autostart=true", "autorestart=true", "startsecs=2",
                "startretries=10", "stopsignal=TERM", f"stopwaitsecs={stopwait}", "stopasgroup=true",
                "killasgroup=true", "redirect_stderr=true", f"stdout_logfile={LOGS / (name + '.log')}",
                "stdout_logfile_maxbytes=20MB", "stdout_logfile_backups=3", ""]
    CONF.write_text("\n".join(out))
    write_prometheus_config(ports)


def write_prometheus_config(ports: dict[str, int]) -> None:
    """var/prometheus.yml: a scrape config for this stack (the API and every worker), ready for
    ``prometheus --config.file var/prometheus.yml``; grafana/dashboard.json charts what it scrapes."""
    def reachable(host: str) -> str:  # a wildcard bind is reached on loopback
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    api_job = {"job_name": "inference-api",
               "static_configs": [{"targets": [f"{reachable(settings.API_HOST)}:{settings.API_PORT}"]}]}
    if settings.API_KEYS:
        api_job["authorization"] = {"type": "Bearer", "credentials": settings.API_KEYS[0]}
    # Each worker's series carry their own model label; the target's label is "server", so that
    # Prometheus does not rename theirs to exported_model.
    config = {"global": {"scrape_interval": "5s"}, "scrape_configs": [api_job, {
        "job_name": "inference-workers",
        "static_configs": [{"targets": [f"{reachable(settings.WORKER_METRICS_HOST)}:{port}"],
                            "labels": {"server": f"worker-{name}"}} for name, port in ports.items()]}]}
    path = VAR / "prometheus.yml"
    # Created 0600 (it may hold an API key), never readable by others even for a moment.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write("# Written by make up (scripts/stack.py). JSON is YAML.\n" + json.dumps(config, indent=2) + "\n")
    path.chmod(0o600)  # (an older file keeps its mode through O_TRUNC)


#: Room for long headers and URLs so the API (not gunicorn, in HTML) answers them with JSON errors.
GUNICORN_LIMITS = "--limit-request-line 16384 --limit-request-field_size 32768"


def commands(models: list[str], bin_dir: str, api_bind: str, api_workers: int, api_threads: int,
             root: str = "") -> dict[str, str]:
    """The command line of each program, by program name: the one place they are written, read by
    ``render`` (supervisord) and checked against docker-compose.yml by the tests."""
    out = {"api": f"{bin_dir}gunicorn --config {root}gunicorn_conf.py --bind {api_bind} --workers {api_workers} "
                  f"--worker-class gthread --threads {api_threads} --timeout 60 --graceful-timeout 30 "
                  f"{GUNICORN_LIMITS} --access-logfile - wsgi:app"}
    for name in models:
        out[f"worker-{name}"] = (f"{bin_dir}celery -A workers worker --model {name} --loglevel INFO "
                                 f"--hostname worker-{name}@%h")
    out["flower"] = f"{bin_dir}celery -A workers flower --conf={root}flower/flowerconfig.py"
    return out


def supervisorctl(*args: str, check: bool = False) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "supervisorctl"), "-c", str(CONF), *args],
                          capture_output=True, text=True, check=check)


def supervisord_running() -> bool:
    return CONF.exists() and SOCK.exists() and supervisorctl("pid").stdout.strip().isdigit()


def port_busy(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def http(url: str, data: bytes | None = None, headers: dict | None = None, timeout: float = 5.0):
    headers = dict(headers or {})
    if settings.API_KEYS and "Authorization" not in headers:
        headers["X-API-Key"] = settings.API_KEYS[0]  # our own readiness checks and warm-up
    req = urllib.request.Request(url, data=data, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return None, b""


def wait_for(what: str, check, timeout_s: float, log: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.5)
    tail = (LOGS / log).read_text()[-3000:] if (LOGS / log).exists() else "(no log)"
    sys.exit(f"error: {what} did not come up in {timeout_s:.0f}s; last lines of {LOGS / log}:\n{tail}")


def sample_input(spec) -> object:
    if spec.input_kind == "text":
        return "I love this, it works great"
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 120, 40)).save(buf, "PNG")
    item = {"image_b64": base64.b64encode(buf.getvalue()).decode()}
    if spec.task == "zero-shot-image":
        item["labels"] = ["a photo", "a drawing"]
    return item


def warm_up(api: str, spec) -> str | None:
    """One real job through the model; returns the model's name if it failed."""
    start = time.monotonic()
    body = json.dumps({"model": spec.name, "input": sample_input(spec)}).encode()
    status, raw = http(f"{api}/jobs", body, {"Content-Type": "application/json"})
    if status != 202:
        print(f"    {spec.name:<20} FAILED: submit answered {status}: {raw[:300]!r}")
        return spec.name
    status, raw = http(f"{api}/jobs/{json.loads(raw)['id']}?wait=30", timeout=40)
    job = json.loads(raw) if status == 200 else {}
    if job.get("status") != "succeeded":
        print(f"    {spec.name:<20} FAILED: ended {job.get('status')}: {job.get('error')} "
              f"(see {LOGS / ('worker-' + spec.name + '.log')})")
        return spec.name
    print(f"    {spec.name:<20} ok in {time.monotonic() - start:.1f}s "
          f"(queue {job['queue_ms']} ms, run {job['run_ms']} ms)")
    return None


def up(args) -> None:
    for d in (VAR, LOGS):
        d.mkdir(parents=True, exist_ok=True)
    registry = Registry.from_file(settings.MODELS_FILE, settings.MODELS or None)
    credential = flower_credential()
    api = f"http://127.0.0.1:{settings.API_PORT}"
    if not supervisord_running():
        busy = [f"{name} port {port}" for name, port in
                [("API", settings.API_PORT), ("Flower", settings.FLOWER_PORT)]
                + ([("Redis", local_redis()[1])] if local_redis() else [])
                + [(f"worker-{name} metrics", port) for name, port in metrics_ports(registry).items()]
                if port_busy("127.0.0.1", port)]
        if busy:
            sys.exit(f"error: {', '.join(busy)} already in use by another program; stop it or set "
                     "API_PORT / FLOWER_PORT / REDIS_URL / WORKER_METRICS_PORT (the first worker's)")
        render(registry, credential)
        say("starting supervisord")
        # A minimal environment: programs see exactly the settings their config gives them,
        # never a value left over from the shell that first started supervisord.
        base_env = {k: os.environ[k] for k in ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "USER") if k in os.environ}
        subprocess.run([str(VENV_BIN / "supervisord"), "-c", str(CONF)], check=True, env=base_env)
    else:
        render(registry, credential)
        say("supervisord already running: applying changes (programs whose settings changed restart)")
        supervisorctl("reread")
        supervisorctl("update")
        supervisorctl("start", "all")

    if local_redis():
        host, port, password = local_redis()
        wait_for("Redis", lambda: port_busy(host, port), 30, "redis.log")
    wait_for("the API", lambda: http(f"{api}/readyz")[0] == 200, 90, "api.log")
    for spec in registry:
        def live(name=spec.name):
            status, body = http(f"{api}/models")
            if status != 200:
                return False
            models = {m["name"]: m for m in json.loads(body)["models"]}
            return bool(models.get(name, {}).get("workers"))
        wait_for(f"worker-{spec.name}", live, 180, f"worker-{spec.name}.log")
    auth = "Basic " + base64.b64encode(credential.encode()).decode()
    wait_for("Flower", lambda: http(f"http://127.0.0.1:{settings.FLOWER_PORT}/api/workers",
                                    headers={"Authorization": auth})[0] == 200, 60, "flower.log")
    if not args.no_warmup:
        say("warming up: one job per model (loads each model once)")
        failed = [name for name in map(lambda spec: warm_up(api, spec), registry) if name]
        if failed:
            sys.exit(f"error: warm-up failed for {', '.join(failed)}. Everything is still running so you "
                     f"can look: logs in {LOGS}/, `make down` to stop.")
    host_note = "" if settings.API_HOST == "127.0.0.1" else f" (listening on {settings.API_HOST})"
    workers_metrics = ", ".join(f"{name} :{port}" for name, port in metrics_ports(registry).items())
    print(f"""
The system is up.
  API        {api}{host_note}   docs: {api}/docs   spec: {api}/openapi.json
  Flower     http://127.0.0.1:{settings.FLOWER_PORT}   login {credential}
  Redis      {celeryconfig.broker_url}
  Models     {', '.join(registry.names())}
  Metrics    {api}/metrics and, per worker, {workers_metrics}
             Prometheus scrape config: {VAR / 'prometheus.yml'}   Grafana dashboard: grafana/dashboard.json
  Logs       {LOGS}/   (supervisorctl: .venv/bin/supervisorctl -c {CONF} status)
Try:
  curl -s -XPOST {api}/jobs -H 'content-type: application/json' -d '{{"model":"minilm","input":"hello world"}}'
  curl -s '{api}/jobs/<id>?wait=10'
Stop with: make down""")


def down(_args) -> None:
    if not supervisord_running():
        say("nothing running")
        return
    pid = supervisorctl("pid").stdout.strip()
    say("stopping workers, API, Flower and Redis")
    supervisorctl("shutdown")
    end = time.monotonic() + 90
    while time.monotonic() < end:
        try:
            os.kill(int(pid), 0)
        except (OSError, ValueError):
            say("stopped")
            return
        time.sleep(0.5)
    sys.exit(f"error: supervisord (pid {pid}) still running after 90s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_up = sub.add_parser("up")
    p_up.add_argument("--no-warmup", action="store_true", help="skip the one-job-per-model warm-up")
    sub.add_parser("down")
    args = parser.parse_args()
    {"up": up, "down": down}[args.cmd](args)


if __name__ == "__main__":
    main()
