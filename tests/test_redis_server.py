import redis

from gateway.redis_server import RedisServer


def test_session_redis_is_real(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    info = client.info("server")
    assert "redis_version" in info
    assert client.config_get("appendonly")["appendonly"] == "yes"
    client.close()


def test_stop_is_clean(tmp_path) -> None:
    server = RedisServer(tmp_path)
    server.start()
    client = redis.Redis.from_url(server.url)
    client.set("k", "v")
    client.close()
    server.stop()
    assert (tmp_path / "appendonly.aof").exists()
    # a restart in the same data directory sees the data again (AOF persistence)
    again = RedisServer(tmp_path)
    again.start()
    client = redis.Redis.from_url(again.url)
    assert client.get("k") == b"v"
    client.close()
    again.stop()
