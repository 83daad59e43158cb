import redis


def test_redis_fixture_gives_a_real_non_zero_database(redis_url: str, run_id: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert client.connection_pool.connection_kwargs["db"] != 0
    client.set(f"{run_id}:probe", "1")
    assert client.get(f"{run_id}:probe") == b"1"
    client.close()
