"""workers.app: the kombu Redis client reuse, against a real redis-server."""

from kombu import Connection

from tests.procs import start_redis


def test_a_kombu_redis_channel_reuses_one_client_for_its_commands(tmp_path):
    import workers.app  # noqa: F401  (installs the reuse)
    from kombu.transport import redis as kombu_redis

    assert getattr(kombu_redis.Channel._create_client, "reuses_clients", False)
    redis_proc, url = start_redis(tmp_path)
    try:
        with Connection(url) as conn:
            channel = conn.default_channel
            first, second = channel._create_client(), channel._create_client()
            assert first is second and first.connection_pool is channel.pool
            assert channel._create_client(asynchronous=True) is not first  # BRPOP keeps its own
            queue = conn.SimpleQueue("reuse-test")  # publish, fetch and ack all go through it
            queue.put({"n": 1})
            message = queue.get(timeout=5)
            assert message.payload == {"n": 1}
            message.ack()
            queue.close()
            channel._pool = None  # what closing the channel does: a new pool gets a new client
            assert channel._create_client() is not first
    finally:
        redis_proc.stop()
