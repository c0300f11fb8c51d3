"""tasks.messages: the message the API pushes itself is the one Celery's send_task pushes."""

import json

import pytest
from celery import Celery

from celeryconfig import PRIORITIES
from tasks.messages import direct_publish_possible, task_message


@pytest.fixture
def app(redis_url):
    app = Celery("messages-test")
    app.config_from_object("celeryconfig")
    app.conf.update(broker_url=redis_url, result_backend=redis_url)
    yield app
    app.close()


def _without_tag(raw: str) -> dict:
    message = json.loads(raw)
    assert message["properties"].pop("delivery_tag")
    return message


@pytest.mark.parametrize("priority", sorted(PRIORITIES.values()))
def test_the_message_is_the_one_send_task_pushes_on_the_same_list(app, redis_client, priority):
    kwargs = {"model": "minilm", "n_inputs": 2, "single": False}
    app.send_task("tasks.infer", task_id="job-1", queue="jobs.msg", priority=priority, kwargs=kwargs,
                  ignore_result=True)
    [key] = [k for k in redis_client.keys("jobs.msg*")]
    celerys = redis_client.lpop(key)
    ours_key, ours = task_message(app, "tasks.infer", "job-1", "jobs.msg", priority, kwargs)
    assert ours_key == key
    assert _without_tag(ours) == _without_tag(celerys)


def test_direct_publishing_needs_one_redis_and_no_sent_events(app):
    assert direct_publish_possible(app)
    app.conf.task_send_sent_event = True
    assert not direct_publish_possible(app)
    app.conf.task_send_sent_event = False
    app.conf.result_backend = app.conf.broker_url + "1"  # another database
    assert not direct_publish_possible(app)
