"""GET /metrics: Prometheus text.

Job counters live in Redis (the workers and every API process add to them),
so any API process reports the whole cluster; queue depths are read at scrape.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from celeryconfig import PRIORITIES

bp = Blueprint("metrics", __name__)


class _ClusterCollector:
    def __init__(self, store, registry):
        self.store, self.registry = store, registry

    def collect(self):
        submitted, finished = self.store.counters()
        sub = CounterMetricFamily("jobs_submitted", "Jobs accepted by the API",
                                  labels=["model", "priority"])
        for key, value in sorted(submitted.items()):
            sub.add_metric(key.split("|", 1), float(value))
        fin = CounterMetricFamily("jobs_finished", "Jobs that reached a terminal status",
                                  labels=["model", "priority", "status"])
        for key, value in sorted(finished.items()):
            parts = key.split("|")
            if len(parts) == 3:
                fin.add_metric(parts, float(value))
        depth = GaugeMetricFamily("queue_depth", "Jobs waiting in a model's queue",
                                  labels=["model", "priority"])
        workers = GaugeMetricFamily("workers_live", "Workers heartbeating for a model", labels=["model"])
        for spec in self.registry:
            for priority, n in self.store.queue_depths(spec.name, PRIORITIES).items():
                depth.add_metric([spec.name, priority], n)
            workers.add_metric([spec.name], len(self.store.live_workers(spec.name)))
        yield from (sub, fin, depth, workers)


@bp.get("/metrics")
def metrics():
    registry = CollectorRegistry()
    registry.register(_ClusterCollector(current_app.extensions["jobstore"],
                                        current_app.extensions["registry"]))
    return Response(generate_latest(registry), mimetype="text/plain; version=0.0.4")
