"""Options of a `celery` alias: validated at start-up, with messages naming the variable."""

from __future__ import annotations

from typing import Any

import pytest
from taskbridge_celery import CeleryBackend, CeleryOptions
from taskbridge_celery._options import celery_config

from taskbridge import ConfigurationError, TaskBridge
from taskbridge.backends import load_backend_class


def backend(**options: Any) -> CeleryBackend:
    return CeleryBackend("celery", {"broker_url": "redis://localhost:6379/3", **options})


def test_the_entry_point_names_the_backend_and_its_capabilities() -> None:
    assert load_backend_class("celery") is CeleryBackend
    assert CeleryBackend.options_model is CeleryOptions
    assert (CeleryBackend.supports_delay, CeleryBackend.supports_queues) == (True, True)
    assert CeleryBackend.supports_worker and not CeleryBackend.runs_in_process


def test_dev_options_point_broker_and_results_at_the_throwaway_redis() -> None:
    options = CeleryBackend.dev_options("redis://127.0.0.1:7000/1")
    assert options == {
        "broker_url": "redis://127.0.0.1:7000/1",
        "result_backend": options["broker_url"],
    }
    assert backend(**options).options.result_backend == "redis://127.0.0.1:7000/1"


def test_defaults() -> None:
    options = backend().options
    assert options.default_queue == "taskbridge"
    assert (options.result_backend, options.key_prefix, options.visibility_timeout) == (
        None,
        None,
        None,
    )


@pytest.mark.parametrize(
    ("options", "variable", "words"),
    [
        ({"broker_url": "sqs://x"}, "BROKER_URL", "sqs://"),
        ({"broker_url": "localhost"}, "BROKER_URL", "(none)"),
        ({"result_backend": "db+sqlite:///x"}, "RESULT_BACKEND", "redis://"),
        ({"broker_url": "amqp://h//", "key_prefix": "p:"}, "KEY_PREFIX", "no Redis"),
        ({"broker_url": "amqp://h//", "visibility_timeout": 10}, "VISIBILITY_TIMEOUT", "Redis"),
        ({"celery": {"task_serializer": "pickle"}}, "CELERY", "never pickle"),
        ({"celery": {"accept_content": ["json", "pickle"]}}, "CELERY", "never pickle"),
        ({"celery": {"worker_max_task_per_child": 3}}, "CELERY", "worker_max_tasks_per_child"),
        ({"celery": {"broker_url": "redis://x"}}, "CELERY", "'broker_url'"),
        ({"celery": {"task_default_queue": "q"}}, "CELERY", "default_queue"),
        ({"bogus": 1}, "BOGUS", "Extra inputs"),
    ],
)
def test_bad_options_fail_at_start_up_naming_the_variable(
    options: dict[str, Any], variable: str, words: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        backend(**options)
    message = str(raised.value)
    assert f"TASKBRIDGE_BACKENDS__CELERY__{variable}" in message
    assert words in message


def test_a_key_prefix_is_allowed_with_amqp_when_results_are_in_redis() -> None:
    options = CeleryBackend(
        "celery",
        {"broker_url": "amqp://h//", "result_backend": "redis://h/2", "key_prefix": "app:"},
    ).options
    config = celery_config(options)
    assert config["result_backend_transport_options"] == {"global_keyprefix": "app:"}
    assert "global_keyprefix" not in config["broker_transport_options"]


def test_the_celery_configuration_is_json_only_with_at_least_once_delivery() -> None:
    config = celery_config(
        backend(
            key_prefix="p:",
            visibility_timeout=120,
            default_queue="work",
            celery={"broker_transport_options": {"priority_steps": [0, 5]}},
        ).options
    )
    assert config["task_serializer"] == config["result_serializer"] == "json"
    assert config["accept_content"] == config["result_accept_content"] == ["json"]
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1 and config["task_track_started"]
    assert config["broker_connection_retry_on_startup"]
    assert config["task_default_queue"] == config["task_default_routing_key"] == "work"
    assert config["broker_transport_options"] == {
        "priority_steps": [0, 5],
        "global_keyprefix": "p:",
        "visibility_timeout": 120,
    }


def test_celery_settings_from_the_environment_get_their_types(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TASKBRIDGE_BACKENDS__CELERY__BROKER_URL", "redis://h:6379/4")
    monkeypatch.setenv("TASKBRIDGE_BACKENDS__CELERY__CELERY__WORKER_MAX_TASKS_PER_CHILD", "50")
    monkeypatch.setenv("TASKBRIDGE_BACKENDS__CELERY__CELERY__TASK_ACKS_ON_FAILURE_OR_TIMEOUT", "0")
    monkeypatch.setenv(
        "TASKBRIDGE_BACKENDS__CELERY__CELERY__BROKER_TRANSPORT_OPTIONS", '{"max_connections": 5}'
    )
    monkeypatch.setenv("TASKBRIDGE_BACKENDS__CELERY__CELERY__BROKER_CONNECTION_TIMEOUT", "1.5")
    found = TaskBridge().backend("celery")
    assert isinstance(found, CeleryBackend)
    assert found.options.celery == {
        "worker_max_tasks_per_child": 50,
        "task_acks_on_failure_or_timeout": False,
        "broker_transport_options": {"max_connections": 5},
        "broker_connection_timeout": 1.5,
    }
    app = found.app
    assert app.conf.worker_max_tasks_per_child == 50
    assert app.conf.broker_transport_options == {"max_connections": 5}
    app.close()


def test_a_delay_is_accepted_because_celery_supports_it() -> None:
    bridge = TaskBridge({"backends": {"celery": {"broker_url": "redis://h/1"}}})

    @bridge.task(name="opts.later", backend="celery", delay=30, queue="slow")
    def later() -> None:
        """Only validated."""

    bridge.validate()
    assert bridge.resolve(later).policy.delay == 30


@pytest.mark.parametrize(
    "options",
    [
        {"broker_url": "redis://h/1"},
        {"broker_url": "amqp://h//", "result_backend": "redis://h/2"},
    ],
    ids=["redis-broker", "amqp-with-redis-results"],
)
def test_an_idempotency_key_is_accepted_where_a_redis_can_hold_it(options: dict[str, Any]) -> None:
    bridge = TaskBridge({"backends": {"celery": options}})

    @bridge.task(name="opts.keyed", backend="celery")
    def charge(order: int) -> None:
        """Only validated."""

    bridge.validate()
    _, call = bridge.prepare(charge.using(key="order-1"), (1,), {})
    assert call.policy.key == "order-1"


def test_an_idempotency_key_without_any_redis_is_refused_rather_than_ignored() -> None:
    bridge = TaskBridge({"backends": {"celery": {"broker_url": "amqp://u:secret@h//"}}})

    @bridge.task(name="opts.keyed", backend="celery")
    def charge(order: int) -> None:
        """Only validated."""

    bridge.validate()
    with pytest.raises(ConfigurationError, match="cannot deduplicate") as raised:
        bridge.prepare(charge.using(key="order-1"), (1,), {})
    message = str(raised.value)
    assert "neither a Redis broker nor a Redis result_backend" in message
    assert "secret" not in message


def test_status_needs_a_result_backend() -> None:
    assert CeleryBackend.supports_status and CeleryBackend.supports_cancel
    without = backend()
    assert without.supports_status is False and without.supports_cancel
    assert backend(result_backend="redis://localhost:6379/4").supports_status is True
