"""Builds the Celery app: config from ``celeryconfig``, tasks from ``tasks``, and the
``--model`` worker option that binds a worker to one model's queue."""

from __future__ import annotations

import math

from celery import Celery, bootsteps
from click import Option


def make_celery() -> Celery:
    celery = Celery("workers", include=["tasks.infer"])
    celery.config_from_object("celeryconfig")
    celery.user_options["worker"].add(Option(
        ["--model"], default=None, help="Serve this model (a name from MODELS_FILE): "
        "consume its queue with its batch settings."))
    celery.steps["worker"].add(ModelBinding)
    celery.steps["consumer"].add(Heartbeat)
    return celery


class ModelBinding(bootsteps.Step):
    """``--model NAME``: queue ``jobs.NAME``, node name ``worker-NAME@host``,
    prefetch large enough for two batches, and the batch settings on the task."""

    def __init__(self, worker, model=None, **options):
        super().__init__(worker, **options)
        if not model:
            return
        from models import ConfigError, UnknownModel, load_registry, runner_class
        from workers import state

        try:
            spec = load_registry().get(model)
            runner_class(spec).check_spec(spec)
            runner_class(spec).preload()
        except (ConfigError, UnknownModel) as exc:
            raise SystemExit(f"error: {exc}") from None
        state.bind(spec)
        queues = worker.app.amqp.queues
        if set(queues.consume_from) <= {worker.app.conf.task_default_queue}:
            worker.setup_queues([spec.queue])
        if worker.hostname.startswith("celery@"):
            worker.hostname = f"worker-{spec.name}@{worker.hostname.split('@', 1)[1]}"
        concurrency = max(1, worker.concurrency or 1)
        worker.prefetch_multiplier = max(worker.prefetch_multiplier or 1,
                                         math.ceil(2 * spec.max_batch_size / concurrency))
        worker.app.tasks["tasks.infer"].configure(spec.max_batch_size, spec.max_wait_ms)


class Heartbeat(bootsteps.StartStopStep):
    """Refreshes this node in ``workers:<model>`` every few seconds so the API can count live workers."""

    requires = ("celery.worker.consumer.tasks:Tasks",)
    interval_s = 5.0

    def __init__(self, consumer, **options):
        super().__init__(consumer, **options)
        self.tref = None

    def start(self, consumer):
        from workers import state

        if state.spec is None:
            return
        self.beat(consumer)
        self.tref = consumer.timer.call_repeatedly(self.interval_s, self.beat, (consumer,))

    def beat(self, consumer):
        from workers import state

        try:
            state.store().heartbeat(state.spec.name, consumer.hostname, int(self.interval_s * 3))
        except Exception as exc:  # Redis down: the next beat tries again
            consumer.app.log.get_default_logger().warning("heartbeat failed: %s", exc)

    def stop(self, consumer):
        from workers import state

        if self.tref is not None:
            self.tref.cancel()
            self.tref = None
        if state.spec is not None:
            try:
                state.store().leave(state.spec.name, consumer.hostname)
            except Exception:
                pass


app = make_celery()
