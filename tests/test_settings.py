"""Settings come from init values, environment, .env and pyproject, validated at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest

from taskbridge import ConfigurationError, TaskBridge, UnknownBackendError
from taskbridge.backends._builtin import ImmediateBackend, RecordingBackend


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Run each test in an empty directory with no TASKBRIDGE_ variables set."""
    import os

    for name in list(os.environ):
        if name.startswith("TASKBRIDGE_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_environment_variables_with_nesting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKBRIDGE_DEFAULT_BACKEND", "bulk")
    monkeypatch.setenv("TASKBRIDGE_BACKENDS__BULK__ENGINE", "recording")
    monkeypatch.setenv("TASKBRIDGE_ROUTES", '{"jobs.*": "immediate", "x.*": {"retries": 2}}')
    monkeypatch.setenv("TASKBRIDGE_STRICT_ARGUMENTS", "true")
    bridge = TaskBridge()
    assert bridge.settings.default_backend == "bulk"
    assert bridge.settings.strict_arguments is True
    assert list(bridge.settings.routes) == ["jobs.*", "x.*"]
    assert isinstance(bridge.backend("bulk"), RecordingBackend)


def test_dotenv_and_pyproject(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (isolated / "pyproject.toml").write_text(
        '[tool.taskbridge]\ndefault_backend = "immediate"\ndispatch_timeout = 2.5\n'
        '[tool.taskbridge.backends.rec]\nengine = "recording"\n'
    )
    assert TaskBridge().settings.default_backend == "immediate"
    (isolated / ".env").write_text("TASKBRIDGE_DEFAULT_BACKEND=rec\n")
    bridge = TaskBridge()
    # .env beats pyproject; pyproject still supplies what .env does not set
    assert (bridge.settings.default_backend, bridge.settings.dispatch_timeout) == ("rec", 2.5)
    monkeypatch.setenv("TASKBRIDGE_DEFAULT_BACKEND", "inprocess")
    assert TaskBridge().settings.default_backend == "inprocess"
    # values given in code beat everything
    assert TaskBridge({"default_backend": "x"}).settings.default_backend == "x"


def test_settings_are_not_read_before_they_are_needed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKBRIDGE_DISPATCH_TIMEOUT", "not a number")
    bridge = TaskBridge()  # constructing and decorating must not read settings

    @bridge.task
    def job() -> None: ...

    with pytest.raises(ConfigurationError, match="TASKBRIDGE_DISPATCH_TIMEOUT"):
        bridge.validate()


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "TASKBRIDGE_DISPATCH_TIMEOUT",
            "-1",
            r"TASKBRIDGE_DISPATCH_TIMEOUT: Input should be greater",
        ),
        ("TASKBRIDGE_ROUTES", "not json", r"TASKBRIDGE_ROUTES is not valid JSON"),
        ("TASKBRIDGE_STRICT_ARGUMENTS", "maybe", r"TASKBRIDGE_STRICT_ARGUMENTS"),
    ],
)
def test_invalid_values_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError, match=message):
        TaskBridge().validate()


def test_unknown_setting_in_code_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="TASKBRIDGE_DEFALT_BACKEND"):
        TaskBridge({"defalt_backend": "x"}).validate()


def test_backend_options_are_validated_and_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TASKBRIDGE_BACKENDS__IMMEDIATE__COLOUR", "red")
    with pytest.raises(ConfigurationError, match="TASKBRIDGE_BACKENDS__IMMEDIATE__COLOUR"):
        TaskBridge().validate()


def test_unknown_backends_fail_at_startup_with_a_hint() -> None:
    with pytest.raises(UnknownBackendError) as caught:
        TaskBridge({"default_backend": "celerey"}).validate()
    assert str(caught.value) == (
        "no backend named 'celerey' is installed (did you mean 'celery'?); installed backends: "
        "arq, celery, immediate, inprocess, recording (or give an import string, "
        "package.module:Class, as the alias's engine option) (backend 'celerey' is named by "
        "TASKBRIDGE_DEFAULT_BACKEND)"
    )
    with pytest.raises(UnknownBackendError, match=r"cannot import backend 'nowhere.mod:Thing'"):
        TaskBridge({"backends": {"x": {"engine": "nowhere.mod:Thing"}}}).validate()
    with pytest.raises(UnknownBackendError, match="not a Backend class"):
        TaskBridge({"backends": {"x": {"engine": "json:dumps"}}}).validate()


def test_a_task_routed_to_an_unknown_backend_fails_at_startup() -> None:
    bridge = TaskBridge()

    @bridge.task(backend="celerie")
    def job() -> None: ...

    with pytest.raises(UnknownBackendError, match=r"named by @task\(backend=...\) of task"):
        bridge.validate()


def test_plugins_resolve_through_entry_points() -> None:
    bridge = TaskBridge({"backends": {"now": {"engine": "immediate"}}})
    assert isinstance(bridge.backend("now"), ImmediateBackend)
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="taskbridge.backends")}
    assert {"celery", "arq"} <= names
