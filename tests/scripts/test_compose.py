"""docker-compose.yml and the Dockerfile, checked for structure: no Docker engine runs here.

Each service must run exactly the command `make up` runs (scripts/stack.py: ``commands``), and every
module, file and setting the files name must exist.
"""

from __future__ import annotations

import re
import sys

import pytest
import yaml

from tests.procs import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import stack  # noqa: E402

import settings  # noqa: E402
from models.registry import Registry  # noqa: E402


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _command(service: dict) -> str:
    command = service["command"]
    return " ".join(command) if isinstance(command, list) else " ".join(command.split())


def test_every_service_runs_what_make_up_runs(compose):
    models = Registry.from_file(ROOT / "models.toml").names()
    expected = stack.commands(models, "", "0.0.0.0:8000", settings.API_WORKERS, settings.API_THREADS)
    services = compose["services"]
    assert set(expected) <= set(services), sorted(set(expected) - set(services))
    for name, command in expected.items():
        assert _command(services[name]) == command, name
    # one worker service per shipped model, and nothing else runs our code unexamined
    ours = {name for name, svc in services.items()
            if (svc.get("build") or svc.get("image", "").startswith("inference")) and not svc.get("profiles")}
    assert ours == set(expected)


def test_locust_runs_the_locustfile_under_a_profile(compose):
    locust = compose["services"]["locust"]
    assert locust["profiles"] == ["load"]
    assert _command(locust) == "locust -f locustfile.py --host http://api:8000"
    assert (ROOT / "locustfile.py").exists()
    assert all(port.startswith("127.0.0.1:") for port in locust["ports"])


def test_redis_has_a_password_persistence_and_a_health_check_and_is_not_published(compose):
    redis = compose["services"]["redis"]
    assert redis["image"].startswith("redis:7")
    command = _command(redis)
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert '--requirepass "${REDIS_PASSWORD:?' in command  # compose refuses to start without one
    assert "ports" not in redis
    assert redis["healthcheck"]["test"] and redis["environment"]["REDISCLI_AUTH"].startswith("${REDIS_PASSWORD")
    for name, service in compose["services"].items():
        if name not in ("redis", "locust", "prometheus", "grafana"):  # these never talk to Redis
            assert service["environment"]["REDIS_URL"].startswith("redis://:${REDIS_PASSWORD:?"), name
            assert service["depends_on"]["redis"]["condition"] == "service_healthy", name


def test_flower_requires_a_credential_and_listens_on_loopback_of_the_host(compose):
    flower = compose["services"]["flower"]
    assert flower["environment"]["FLOWER_BASIC_AUTH"].startswith("${FLOWER_BASIC_AUTH:?")
    assert all(port.startswith("127.0.0.1:") for port in flower["ports"])


def test_every_setting_module_and_file_named_exists(compose):
    known = set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', (ROOT / "celeryconfig.py").read_text()))
    settings_src = (ROOT / "settings.py").read_text()
    known |= set(re.findall(r'_(?:int|list|probability|range_ms)\("([A-Z_]+)"', settings_src))
    known |= set(re.findall(r'os\.environ\.get\("([A-Z_]+)"', settings_src))
    known |= {"TOKENIZERS_PARALLELISM", "TORCH_HOME", "HF_HOME", "HF_HUB_OFFLINE"}  # read by libraries
    known |= set(re.findall(r'"(API_KEY|LOAD_[A-Z_]+)"', (ROOT / "locustfile.py").read_text()))
    for name, service in compose["services"].items():
        if name in ("redis", "grafana", "prometheus"):  # not our code
            continue
        unknown = set(service.get("environment", {})) - known
        assert not unknown, (name, unknown)
    assert (ROOT / "wsgi.py").exists() and (ROOT / "workers" / "__init__.py").exists()
    assert (ROOT / "gunicorn_conf.py").exists()
    assert (ROOT / "flower" / "flowerconfig.py").exists()
    dockerfile = (ROOT / "Dockerfile").read_text()
    for path in re.findall(r"(?:COPY|RUN \.venv/bin/python) (\S+\.(?:txt|py))", dockerfile):
        assert (ROOT / path).exists(), path
    assert "scripts/prefetch.py" in dockerfile  # models are fetched at build time
    for env_name in re.findall(r"\b([A-Z_]{4,})=", dockerfile):
        assert env_name in known | {"PYTHONUNBUFFERED", "PIP_NO_CACHE_DIR", "PIP_DISABLE_PIP_VERSION_CHECK",
                                    "PATH"}, env_name


def test_workers_serve_metrics_and_the_monitoring_profile_scrapes_every_one(compose):
    services = compose["services"]
    workers = sorted(name for name in services if name.startswith("worker-"))
    for name in workers:
        assert services[name]["environment"]["WORKER_METRICS_PORT"] == "9410", name
        assert "ports" not in services[name], name  # metrics stay on the compose network
    scrape = yaml.safe_load((ROOT / "grafana" / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in scrape["scrape_configs"]}
    assert jobs["inference-api"]["dns_sd_configs"][0] == {"names": ["api"], "type": "A", "port": 8000}
    worker_sd = jobs["inference-workers"]["dns_sd_configs"][0]
    assert sorted(worker_sd["names"]) == workers and worker_sd["port"] == 9410
    for name in ("prometheus", "grafana"):
        service = services[name]
        assert service["profiles"] == ["monitoring"], name
        assert all(port.startswith("127.0.0.1:") for port in service["ports"]), name
        for volume in service["volumes"]:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), volume
    datasource = yaml.safe_load((ROOT / "grafana/provisioning/datasources/prometheus.yml").read_text())
    assert datasource["datasources"][0]["url"] == "http://prometheus:9090"
