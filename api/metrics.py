"""GET /metrics: Prometheus text, and the API's own request and rejection metrics.

Two kinds of figure:
* this API's (every gunicorn process, added up: ``metrics.py``): ``api_request_seconds`` by route and
  status, ``api_jobs_rejected_total`` by model and error type;
* the cluster's, read from Redis at scrape, the same from any API process: job counters by model,
  priority and status (the workers and the API add to them in Redis), queue depth by model and
  priority, live workers and unfinished jobs per model.
"""

from __future__ import annotations

import time

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

import metrics as prom
from celeryconfig import PRIORITIES

bp = Blueprint("metrics", __name__)
_METHODS = frozenset(("GET", "POST", "DELETE", "HEAD", "OPTIONS", "PUT", "PATCH"))


class _ClusterCollector:
    def __init__(self, store, registry):
        self.store, self.registry = store, registry

    def collect(self):
        up = GaugeMetricFamily("cluster_up", "1 when this scrape could read the cluster figures from Redis")
        try:
            families = list(self._cluster())
        except Exception as exc:  # Redis down: the API's own figures still answer
            current_app.logger.warning("cluster metrics unavailable: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _cluster(self):
        submitted, finished = self.store.counters()
        sub = CounterMetricFamily("jobs_submitted", "Jobs accepted by the API (cluster-wide, from Redis)",
                                  labels=["model", "priority"])
        for key, value in sorted(submitted.items()):
            sub.add_metric(key.split("|", 1), float(value))
        fin = CounterMetricFamily("jobs_finished", "Jobs that reached a terminal status (cluster-wide, from Redis)",
                                  labels=["model", "priority", "status"])
        for key, value in sorted(finished.items()):
            parts = key.split("|")
            if len(parts) == 3:
                fin.add_metric(parts, float(value))
        depth = GaugeMetricFamily("queue_depth", "Jobs waiting to start, by model and priority",
                                  labels=["model", "priority"])
        workers = GaugeMetricFamily("workers_live", "Workers heartbeating for a model", labels=["model"])
        live = GaugeMetricFamily("jobs_unfinished", "Jobs submitted and not yet finished (queued, running "
                                 "or retrying)", labels=["model"])
        for spec in self.registry:
            for priority, n in self.store.queue_depths(spec.name, PRIORITIES).items():
                depth.add_metric([spec.name, priority], n)
            workers.add_metric([spec.name], len(self.store.live_workers(spec.name)))
            live.add_metric([spec.name], self.store.unfinished(spec.name))
        yield from (sub, fin, depth, workers, live)


@bp.get("/metrics")
def metrics():
    body, content_type = prom.exposition(_ClusterCollector(current_app.extensions["jobstore"],
                                                           current_app.extensions["registry"]))
    return Response(body, content_type=content_type)


def init_request_metrics(app: Flask) -> None:
    """Time every request; count refused submissions by model and error type."""
    known = set(app.extensions["registry"].names())

    @app.before_request
    def _start():
        g.metrics_started = time.perf_counter()

    @app.after_request
    def _observe(response):
        try:
            started = g.pop("metrics_started", None)
            route = request.url_rule.rule if request.url_rule else "unmatched"
            if started is not None:
                method = request.method if request.method in _METHODS else "other"  # a label holds no made-up value
                prom.api().requests.labels(method, route, str(response.status_code)).observe(
                    time.perf_counter() - started)
            if route == "/jobs" and request.method == "POST" and response.status_code >= 400:
                prom.api().rejected.labels(_model_named(known), g.get("error_type", "error")).inc()
        except Exception:  # a metric never costs a request
            current_app.logger.debug("request metrics not recorded", exc_info=True)
        return response


def _model_named(known: set[str]) -> str:
    """The submitted model's name when it is one we serve (a label never holds what a client made up).
    A body too large to read (413) gives "other"."""
    try:
        body = request.get_json(silent=True) if request.is_json else None
        name = body.get("model") if isinstance(body, dict) else request.form.get("model")
    except Exception:
        return "other"
    return name if isinstance(name, str) and name in known else "other"
