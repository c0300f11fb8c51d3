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
    tags = set()
    for job_id in ("6f1c2b0e-3d4a-4e5f-9a8b-7c6d5e4f3a2b", "0b9f8e7d-6c5b-4a39-8827-16f5e4d3c2b1"):  # (the 2nd: cached)
        kwargs = {"model": "minilm", "n_inputs": 2, "single": False}
        app.send_task("tasks.infer", task_id=job_id, queue="jobs.msg", priority=priority, kwargs=kwargs,
                      ignore_result=True)
        [key] = [k for k in redis_client.keys("jobs.msg*")]
        celerys = redis_client.lpop(key)
        ours_key, ours = task_message(app, "tasks.infer", job_id, "jobs.msg", priority, kwargs)
        assert ours_key == key
        tags.add(json.loads(ours)["properties"]["delivery_tag"])
        assert _without_tag(ours) == _without_tag(celerys)
    assert len(tags) == 2  # a delivery tag of its own per message


def test_messages_for_other_arguments_are_not_taken_from_the_cache(app):
    _, one = task_message(app, "tasks.infer", "6f1c2b0e-3d4a-4e5f-9a8b-7c6d5e4f3a2b", "jobs.msg", 9,
                          {"model": "minilm", "n_inputs": 1, "single": True})
    _, three = task_message(app, "tasks.infer", "6f1c2b0e-3d4a-4e5f-9a8b-7c6d5e4f3a2b", "jobs.msg", 9,
                            {"model": "minilm", "n_inputs": 3, "single": False})
    assert json.loads(one)["headers"]["kwargsrepr"] == "{'model': 'minilm', 'n_inputs': 1, 'single': True}"
    assert json.loads(three)["headers"]["kwargsrepr"] == "{'model': 'minilm', 'n_inputs': 3, 'single': False}"


def test_direct_publishing_needs_one_redis_and_no_sent_events(app):
    assert direct_publish_possible(app)
    app.conf.task_send_sent_event = True
    assert not direct_publish_possible(app)
    app.conf.task_send_sent_event = False
    app.conf.result_backend = app.conf.broker_url + "1"  # another database
    assert not direct_publish_possible(app)
