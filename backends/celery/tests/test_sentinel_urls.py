"""Redis Sentinel URLs for the broker and the result backend: validation, the Celery settings
they make, and the API side reading them exactly as kombu and Celery do.

The failover itself (a real Sentinel, its master killed) is in tests/faults/test_sentinel.py.
"""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery  # type: ignore[import-untyped]
from redis.asyncio.sentinel import SentinelConnectionPool
from taskbridge_celery import CeleryBackend, CeleryOptions
from taskbridge_celery._consumer import SENTINEL_TRANSPORT, worker_settings
from taskbridge_celery._options import celery_config, redis_transport
from taskbridge_celery._results import TaskBridgeRedisBackend, TaskBridgeSentinelBackend
from taskbridge_celery._sentinel import (
    async_redis,
    close_async_redis,
    redact,
    sentinel_address,
)
from taskbridge_celery._status import StatusStore
from taskbridge_celery._transport import GuardedRedisTransport, GuardedSentinelTransport
from taskbridge_celery._worker import build_app, restore_interval

from taskbridge import ConfigurationError

SENTINELS = "sentinel://:s3cret@10.0.0.1:26379/3;sentinel://10.0.0.2:26380/3"


def backend(**options: Any) -> CeleryBackend:
    return CeleryBackend("celery", options)


@pytest.mark.parametrize(
    ("options", "variable", "words"),
    [
        ({"broker_url": SENTINELS}, "SENTINEL_MASTER", "broker_url is a sentinel:// URL"),
        (
            {"broker_url": "amqp://h//", "result_backend": SENTINELS},
            "SENTINEL_MASTER",
            "celery.result_backend_transport_options.master_name",
        ),
        (
            {"broker_url": "redis://h/1", "sentinel_master": "m"},
            "SENTINEL_MASTER",
            "neither broker_url nor result_backend is one",
        ),
        (
            {"broker_url": "redis://h/1", "sentinel_password": "p"},
            "SENTINEL_PASSWORD",
            "applies to sentinel:// URLs",
        ),
        (
            {
                "broker_url": SENTINELS,
                "sentinel_master": "m",
                "celery": {"broker_transport_options": {"master_name": "other"}},
            },
            "SENTINEL_MASTER",
            "set only one of them",
        ),
        (  # kombu and Celery would use database 0 here
            {"broker_url": "sentinel://:pw@h1:26379;sentinel://h2:26379/1", "sentinel_master": "m"},
            "BROKER_URL",
            "put /1 on the first URL",
        ),
        (
            {"broker_url": "sentinel://h1:26379;sentinel://:pw@h2:26379", "sentinel_master": "m"},
            "BROKER_URL",
            "credentials from the first",
        ),
        ({"broker_url": "sentinel://h1/1", "sentinel_master": "m"}, "BROKER_URL", "no port"),
        (
            {"broker_url": "sentinel://h1:26379;redis://h2:6379", "sentinel_master": "m"},
            "BROKER_URL",
            "is not sentinel://host:port",
        ),
        (
            {"broker_url": "sentinel://h1:26379/x", "sentinel_master": "m"},
            "BROKER_URL",
            "database number",
        ),
        (
            {"broker_url": "sentinel://h1:26379/1?socket_timeout=3", "sentinel_master": "m"},
            "BROKER_URL",
            "no query options",
        ),
        (
            {
                "broker_url": "redis://h/1",
                "result_backend": "sentinel://h1:26379/x",
                "sentinel_master": "m",
            },
            "RESULT_BACKEND",
            "database number",
        ),
        (
            {
                "broker_url": SENTINELS,
                "sentinel_master": "m",
                "celery": {"broker_use_ssl": {"ssl_cert_reqs": "required"}},
            },
            "CELERY",
            "TLS to a Sentinel-managed Redis",
        ),
        ({"broker_url": "rediss+sentinel://h:1"}, "BROKER_URL", "sentinel://"),
    ],
)
def test_bad_sentinel_options_fail_at_start_up_naming_the_variable(
    options: dict[str, Any], variable: str, words: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        backend(**options)
    message = str(raised.value)
    assert f"TASKBRIDGE_BACKENDS__CELERY__{variable}:" in message
    assert words in message
    assert "s3cret" not in message and message.count("TASKBRIDGE_BACKENDS__") == 1


def test_sentinel_master_fills_the_transport_options_of_each_sentinel_url() -> None:
    options = backend(
        broker_url=SENTINELS,
        result_backend="sentinel://10.0.0.1:26379/4",
        sentinel_master="mymaster",
        sentinel_password="sentinel-pw",
        key_prefix="app:",
        visibility_timeout=30,
        celery={"broker_transport_options": {"sentinel_kwargs": {"socket_timeout": 2}}},
    ).options
    config = celery_config(options)
    assert config["broker_transport_options"] == {
        "sentinel_kwargs": {"socket_timeout": 2, "password": "sentinel-pw"},
        "master_name": "mymaster",
        "global_keyprefix": "app:",
        "visibility_timeout": 30,
    }
    assert config["result_backend_transport_options"] == {
        "master_name": "mymaster",
        "sentinel_kwargs": {"password": "sentinel-pw"},
        "global_keyprefix": "app:",
    }
    assert redis_transport(options) and restore_interval(options) == 10.0


def test_only_the_sentinel_url_gets_the_master_name_and_celerys_own_spelling_works() -> None:
    mixed = celery_config(
        backend(broker_url="redis://h/1", result_backend=SENTINELS, sentinel_master="m").options
    )
    assert mixed["broker_transport_options"] == {}
    assert mixed["result_backend_transport_options"] == {"master_name": "m"}
    native = backend(
        broker_url=SENTINELS,
        celery={"broker_transport_options": {"master_name": "n", "min_other_sentinels": 1}},
    )
    assert celery_config(native.options)["broker_transport_options"] == {
        "master_name": "n",
        "min_other_sentinels": 1,
    }


@pytest.mark.parametrize(
    "url",
    [
        SENTINELS,
        "sentinel://10.0.0.1:26379",
        "sentinel://:pw@10.0.0.1:26379;sentinel://10.0.0.2:26379/0",
        "sentinel://user:p%40ss@10.0.0.1:26379/2;sentinel://user:p%40ss@10.0.0.2:26379/2",
        "sentinel://10.0.0.1:26379/5;sentinel://10.0.0.2:26381;sentinel://10.0.0.3:26382/5",
    ],
)
def test_the_api_side_reads_a_sentinel_url_as_kombu_and_celery_do(url: str) -> None:
    """Same Sentinels, database and master credentials as kombu's broker connection and
    Celery's SentinelBackend compute (nothing connects)."""
    options = backend(broker_url=url, result_backend=url, sentinel_master="m").options
    address = sentinel_address(url)
    assert address is not None
    app = build_app(options)
    try:
        results = app.backend
        assert isinstance(results, TaskBridgeSentinelBackend)
        assert isinstance(results, TaskBridgeRedisBackend)  # the worker's claim applies
        params = results.connparams
        assert [(h["host"], h["port"]) for h in params["hosts"]] == address.sentinels
        assert params["db"] == address.db
        assert params.get("password") == address.password
        assert params.get("username") == address.username
        assert results._transport_options["master_name"] == "m"
        with app.connection_for_write() as connection:
            # kombu's SentinelChannel: every `;` part, else the one host (its connparams)
            alternates = [sentinel_address(alt) for alt in connection.alt]
            kombu_hosts = [a.sentinels[0] for a in alternates if a] or [
                (connection.hostname, connection.port)
            ]
            assert kombu_hosts == address.sentinels
            vhost = (connection.virtual_host or "/").strip("/")  # as _prepare_virtual_host
            assert int(vhost or 0) == address.db
            assert (connection.userid or None, connection.password) == (
                address.username,
                address.password,
            )
    finally:
        app.close()


def test_the_worker_app_gets_the_guarded_sentinel_transport() -> None:
    options = CeleryOptions(broker_url=SENTINELS, sentinel_master="m")
    settings = worker_settings(options)
    assert settings["broker_transport"] == SENTINEL_TRANSPORT
    assert "broker_use_ssl" not in settings
    app = Celery("worker-app-test", set_as_current=False)  # build_app(worker=True), not current
    app.conf.update(celery_config(options))
    app.conf.update(settings)
    with app.connection_for_read() as connection:
        transport = connection.get_transport_cls()
        assert transport is GuardedSentinelTransport
        assert issubclass(transport, GuardedRedisTransport)  # the same guards
        assert connection.alt == SENTINELS.split(";")
        assert connection.transport_options["master_name"] == "m"
        assert connection.transport.default_port == 26379
    app.close()


async def test_the_api_side_client_asks_the_sentinels_for_the_master() -> None:
    transport = {
        "master_name": "mymaster",
        "min_other_sentinels": 1,
        "sentinel_kwargs": {"password": "sentinel-pw"},
    }
    client = async_redis(SENTINELS, transport, 2.5)
    try:
        pool = client.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == "mymaster" and pool.is_master
        assert pool.connection_kwargs["db"] == 3
        assert pool.connection_kwargs["password"] == "s3cret"
        assert pool.connection_kwargs["socket_timeout"] == 2.5
        manager = pool.sentinel_manager
        assert manager.min_other_sentinels == 1
        assert [
            (
                s.connection_pool.connection_kwargs["host"],
                s.connection_pool.connection_kwargs["port"],
            )
            for s in manager.sentinels
        ] == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
        sentinel_kwargs = manager.sentinels[0].connection_pool.connection_kwargs
        assert sentinel_kwargs["password"] == "sentinel-pw"  # not the master's
        assert sentinel_kwargs["socket_connect_timeout"] == 2.5
    finally:
        await close_async_redis(client)
    plain = async_redis("redis://127.0.0.1:6390/4", {}, 1.0)
    assert not isinstance(plain.connection_pool, SentinelConnectionPool)
    assert plain.connection_pool.connection_kwargs["db"] == 4
    await close_async_redis(plain)


@pytest.mark.parametrize(
    ("broker", "result_options", "shared"),
    [
        (SENTINELS, {}, True),
        ("sentinel://10.0.0.1:26379/4", {}, False),
        (SENTINELS, {"master_name": "other"}, False),
    ],
)
async def test_the_status_store_shares_one_client_only_for_the_same_master(
    broker: str, result_options: dict[str, Any], shared: bool
) -> None:
    options: dict[str, Any] = {"broker_url": broker, "result_backend": SENTINELS}
    if result_options:
        options["celery"] = {"result_backend_transport_options": result_options}
        options["celery"]["broker_transport_options"] = {"master_name": "m"}
    else:
        options["sentinel_master"] = "m"
    store = StatusStore(backend(**options).options, 1.0)
    clients = store._for_loop()
    try:
        assert (clients.markers is None) is shared
        pool = clients.results.connection_pool
        assert isinstance(pool, SentinelConnectionPool)
        assert pool.service_name == result_options.get("master_name", "m")
    finally:
        await store.close()


def test_every_password_of_a_sentinel_list_is_redacted() -> None:
    url = "sentinel://:one@h1:26379/1;sentinel://u:two@h2:26379/1"
    assert redact(url) == "sentinel://:***@h1:26379/1;sentinel://u:***@h2:26379/1"
    same = "sentinel://u:one@h1:26379/1;sentinel://u:one@h2:26379/1"
    alias = backend(broker_url=same, sentinel_master="m")
    problem = str(alias._unavailable("does not answer"))
    assert "one" not in problem and "h2:26379" in problem
