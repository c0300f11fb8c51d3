"""workers.transport: bulk fetch and batched acks on kombu's Redis transport, against a real redis-server."""

import pytest
from kombu import Connection, Consumer, Exchange, Producer, Queue

from workers import transport

OPTIONS = {"priority_steps": [0, 5, 9], "queue_order_strategy": "priority", "visibility_timeout": 600}


@pytest.fixture
def bulk():
    transport.enable()
    yield
    transport.disable()


def publish(conn, queue, bodies):
    producer = Producer(conn.default_channel, exchange=Exchange(""), routing_key=queue.name)
    for body, priority in bodies:
        producer.publish(body, priority=priority, serializer="json", declare=[queue])


def consume(conn, queue, prefetch, got):
    consumer = Consumer(conn.default_channel, [queue], callbacks=[lambda body, message: got.append((body, message))])
    consumer.qos(prefetch_count=prefetch)
    consumer.consume()
    return consumer


def ack_all(conn, got):
    with transport.acks_together(conn.default_channel.qos):
        for _, message in got:
            message.ack()


def test_one_brpop_delivers_a_prefetch_window_in_priority_order_recorded_as_unacked(redis_url, redis_client, bulk):
    queue = Queue("bulk-t")
    with Connection(redis_url, transport_options=OPTIONS) as conn:
        publish(conn, queue, [({"n": i}, 9 if i < 6 else 0) for i in range(10)])  # 6 low, then 4 high
        got = []
        consume(conn, queue, 8, got)
        conn.drain_events(timeout=5)
        # one read: the prefetch window (8), highs first, each in publish order
        assert [body["n"] for body, _ in got] == [6, 7, 8, 9, 0, 1, 2, 3]
        assert redis_client.llen("bulk-t\x06\x169") == 2  # the rest wait their turn
        assert redis_client.hlen("unacked") == 8 and redis_client.zcard("unacked_index") == 8
        with transport.acks_together(conn.default_channel.qos):
            for _, message in got:
                message.ack()
            assert redis_client.hlen("unacked") == 8  # sent together, on leaving
        assert redis_client.hlen("unacked") == 0 and redis_client.zcard("unacked_index") == 0
        conn.drain_events(timeout=5)
        assert [body["n"] for body, _ in got[8:]] == [4, 5]


def test_messages_fetched_in_bulk_and_not_acked_come_back_on_close(redis_url, redis_client, bulk):
    queue = Queue("bulk-r")
    with Connection(redis_url, transport_options=OPTIONS) as conn:
        publish(conn, queue, [({"n": i}, 5) for i in range(5)])
        got = []
        consume(conn, queue, 10, got)
        conn.drain_events(timeout=5)
        assert len(got) == 5 and redis_client.llen("bulk-r\x06\x165") == 0
        got[0][1].ack()
    # closing restores the unacked (kombu's restore_at_shutdown reads the entries the script wrote)
    assert redis_client.hlen("unacked") == 0
    with Connection(redis_url, transport_options=OPTIONS) as conn:
        again = []
        consume(conn, queue, 10, again)
        conn.drain_events(timeout=5)
        assert sorted(body["n"] for body, _ in again) == [1, 2, 3, 4]
        ack_all(conn, again)


def test_kombu_fetches_one_at_a_time_when_not_enabled(redis_url, redis_client):
    queue = Queue("bulk-off")
    with Connection(redis_url, transport_options=OPTIONS) as conn:
        publish(conn, queue, [({"n": i}, 5) for i in range(3)])
        got = []
        consume(conn, queue, 10, got)
        conn.drain_events(timeout=5)
        assert len(got) == 1 and redis_client.hlen("unacked") == 1
        ack_all(conn, got)
        assert redis_client.hlen("unacked") == 0


def test_items_that_are_not_kombu_messages_are_set_aside_and_the_rest_delivered(redis_url, redis_client, bulk):
    queue = Queue("bulk-bad")
    with Connection(redis_url, transport_options=OPTIONS) as conn:
        redis_client.lpush("bulk-bad\x06\x165", "not json")  # what BRPOP returns first
        publish(conn, queue, [({"n": 0}, 5)])
        redis_client.lpush("bulk-bad\x06\x165", '{"json": "but no delivery tag"}')  # met by the script
        publish(conn, queue, [({"n": 1}, 5)])
        got = []
        consume(conn, queue, 10, got)
        conn.drain_events(timeout=5)  # kombu's own loads would raise here
        assert [body["n"] for body, _ in got] == [0, 1]
        assert redis_client.lrange(transport.MALFORMED_KEY, 0, -1) == ['{"json": "but no delivery tag"}', "not json"]
        assert redis_client.llen("bulk-bad\x06\x165") == 0 and redis_client.hlen("unacked") == 2
        ack_all(conn, got)


@pytest.fixture
def reserved(bulk):
    transport.reserve(4)
    yield
    transport.reserve(0)


def test_a_reserve_keeps_the_end_of_the_window_for_high_priority_messages(redis_url, redis_client, reserved):
    import socket

    queue = Queue("bulk-reserve")
    with Connection(redis_url, transport_options=OPTIONS) as conn:
        publish(conn, queue, [({"n": i}, 9) for i in range(10)])  # a backlog of low
        got = []
        consume(conn, queue, 8, got)
        conn.drain_events(timeout=5)
        assert [body["n"] for body, _ in got] == [0, 1, 2, 3]  # the window less the reserve (4 of 8)
        publish(conn, queue, [({"n": 100 + i}, 0) for i in range(3)])
        conn.drain_events(timeout=5)
        assert [body["n"] for body, _ in got[4:]] == [100, 101, 102]  # high ones still come in
        with pytest.raises(socket.timeout):  # low ones do not, until acks make room
            conn.drain_events(timeout=0.3)
        assert redis_client.llen("bulk-reserve\x06\x169") == 6 and redis_client.hlen("unacked") == 7
        ack_all(conn, got[:4])
        conn.drain_events(timeout=5)
        assert [body["n"] for body, _ in got[7:]] == [4]  # 3 high held, 1 low: up to the reserve again
        ack_all(conn, got[4:])
        transport.reserve(0)  # off: the whole window fills with low ones again
        conn.drain_events(timeout=5)
        assert [body["n"] for body, _ in got[8:]] == [5, 6, 7, 8, 9]
        ack_all(conn, got[8:])
        assert redis_client.hlen("unacked") == 0


def test_acks_end_the_brpop_on_the_high_lists_at_once(redis_url, redis_client, reserved, monkeypatch):
    import socket

    # Only the acks can end that BRPOP within the test's waits: its own timeout is far beyond them.
    monkeypatch.setattr(transport, "RESERVED_BRPOP_TIMEOUT_S", 30)
    queue = Queue("bulk-unblock")
    with Connection(redis_url, transport_options=OPTIONS) as conn:
        publish(conn, queue, [({"n": i}, 9) for i in range(10)])
        got = []
        consume(conn, queue, 8, got)
        conn.drain_events(timeout=5)
        assert [body["n"] for body, _ in got] == [0, 1, 2, 3]
        with pytest.raises(socket.timeout):  # the window is full up to the reserve: BRPOP on high alone
            conn.drain_events(timeout=0.3)
        assert any(c["cmd"] == "brpop" for c in redis_client.client_list())  # blocked there, for 30 s
        ack_all(conn, got[:2])
        conn.drain_events(timeout=5)  # the acks ended it; the next BRPOP read the low list
        assert [body["n"] for body, _ in got[4:]] == [4, 5]
        ack_all(conn, got[2:])
        conn.drain_events(timeout=5)
        assert [body["n"] for body, _ in got[6:]] == [6, 7, 8, 9]
        ack_all(conn, got[6:])
        assert redis_client.hlen("unacked") == 0
