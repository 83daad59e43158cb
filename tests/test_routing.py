"""Routing precedence: settings route > `.using()` > decorator > default_backend."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import pytest

from taskbridge import ConfigurationError, TaskBridge
from taskbridge.backends import Backend, TaskCall

BACKENDS = {alias: {"engine": "recording"} for alias in ("deco", "used", "routed", "dflt")}

# (decorator policy, using overrides, settings routes, expected {field: (value, source)})
CASES: list[tuple[dict[str, Any], dict[str, Any], dict[str, Any], dict[str, tuple[Any, str]]]] = [
    ({}, {}, {}, {"backend": ("dflt", "default"), "queue": (None, "default")}),
    ({"backend": "deco"}, {}, {}, {"backend": ("deco", "decorator")}),
    ({"backend": "deco"}, {"backend": "used"}, {}, {"backend": ("used", "using")}),
    (
        {"backend": "deco"},
        {"backend": "used"},
        {"jobs.*": "routed"},
        {"backend": ("routed", "route 'jobs.*'")},
    ),
    ({}, {}, {"jobs.*": "routed"}, {"backend": ("routed", "route 'jobs.*'")}),
    (
        {"backend": "deco", "queue": "q-deco", "retries": 2},
        {"queue": "q-used"},
        {"jobs.report": {"retries": 7}},
        {
            "backend": ("deco", "decorator"),
            "queue": ("q-used", "using"),
            "retries": (7, "route 'jobs.report'"),
        },
    ),
    (
        {"timeout": 5.0},
        {"timeout": 9.0},
        {"other.*": {"timeout": 1.0}, "jobs.*": {"queue": "r"}},
        {"timeout": (9.0, "using"), "queue": ("r", "route 'jobs.*'")},
    ),
    # first matching route wins, in settings order
    (
        {},
        {},
        {"jobs.rep*": {"backend": "routed", "retries": 1}, "jobs.*": {"retries": 9}},
        {"backend": ("routed", "route 'jobs.rep*'"), "retries": (1, "route 'jobs.rep*'")},
    ),
]


@pytest.mark.parametrize(("decorator", "using", "routes", "expected"), CASES)
def test_precedence(
    decorator: dict[str, Any],
    using: dict[str, Any],
    routes: dict[str, Any],
    expected: dict[str, tuple[Any, str]],
) -> None:
    bridge = TaskBridge({"default_backend": "dflt", "backends": BACKENDS, "routes": routes})

    def report() -> None: ...

    task = bridge.task(name="jobs.report", **decorator)(report)
    if "other.*" in routes:
        bridge.task(name="other.job")(report)
    variant = task.using(**using) if using else task
    resolved = bridge.resolve(variant)
    for field, (value, source) in expected.items():
        assert (getattr(resolved.policy, field), resolved.sources[field]) == (value, source)
    assert variant.policy == resolved.policy


def test_using_leaves_the_registered_task_alone() -> None:
    bridge = TaskBridge({"backends": BACKENDS})

    @bridge.task(backend="deco", retries=1)
    def job() -> None: ...

    variant = job.using(backend="used", delay=30)
    assert (variant.policy.backend, variant.policy.delay) == ("used", 30)
    assert (job.policy.backend, job.policy.delay) == ("deco", None)
    assert bridge.get_task(job.name) is job


def test_a_route_that_matches_nothing_fails_at_startup() -> None:
    bridge = TaskBridge({"routes": {"billing.*": "immediate"}})

    @bridge.task
    def unrelated() -> None: ...

    with pytest.raises(ConfigurationError, match=r"TASKBRIDGE_ROUTES.*'billing\.\*'.*matches no"):
        bridge.validate()


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ({"*": {"retries": -1}}, r"TASKBRIDGE_ROUTES\['\*'\].*retries"),
        ({"*": {"colour": "red"}}, r"TASKBRIDGE_ROUTES\['\*'\].*colour"),
        ({"*": {"retry_on": "ValueError"}}, r"retry_on"),
    ],
)
def test_invalid_route_fields_name_the_route(routes: dict[str, Any], message: str) -> None:
    bridge = TaskBridge({"routes": routes})
    with pytest.raises(ConfigurationError, match=message):
        bridge.validate()


def test_invalid_decorator_policy_names_the_task() -> None:
    bridge = TaskBridge()
    with pytest.raises(ConfigurationError, match=r"@task for 'x'.*timeout"):
        bridge.task(name="x", timeout=-1)(print)


def test_using_rejects_unknown_fields() -> None:
    bridge = TaskBridge()

    @bridge.task
    def job() -> None: ...

    with pytest.raises(ConfigurationError, match=r"using\(\).*priority"):
        job.using(priority=3)


def test_two_functions_cannot_share_a_name() -> None:
    bridge = TaskBridge()
    bridge.task(name="dup")(print)
    with pytest.raises(ConfigurationError, match="two functions are registered as task 'dup'"):
        bridge.task(name="dup")(repr)


class NoDelayBackend(Backend):
    """A queue backend without delay support, loaded by import string."""

    async def enqueue(self, calls: Sequence[TaskCall]) -> None:
        raise AssertionError("not used")


def test_a_backend_that_cannot_delay_rejects_delay_naming_the_task() -> None:
    bridge = TaskBridge({"backends": {"plain": {"engine": f"{__name__}:NoDelayBackend"}}})

    @bridge.task(backend="plain")
    def job() -> None: ...

    bridge.validate()
    assert isinstance(bridge.backend("plain"), NoDelayBackend)
    with pytest.raises(ConfigurationError, match=rf"task '{job.name}'.*'plain' cannot delay"):
        job.using(delay=3).policy  # noqa: B018
