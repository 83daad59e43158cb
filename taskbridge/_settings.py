"""Settings: typed, read once when the bridge first needs them, never at import time.

Sources, highest precedence first: values passed to `TaskBridge(settings=...)`, environment
variables (`TASKBRIDGE_` prefix, `__` between nested keys), a `.env` file, then
`[tool.taskbridge]` in the working directory's pyproject.toml.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from pydantic import Field, SecretStr, ValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    PyprojectTomlConfigSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from ._exceptions import ConfigurationError

__all__ = ["TaskBridgeSettings", "env_name", "load_settings"]

ENV_PREFIX = "TASKBRIDGE_"


def env_name(*loc: object) -> str:
    """The environment variable that sets the value at `loc`, e.g. TASKBRIDGE_BACKENDS__ARQ__X."""
    return ENV_PREFIX + "__".join(str(part).upper() for part in loc)


class TaskBridgeSettings(BaseSettings):
    """Everything a deployment can decide without touching code."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        env_file=".env",
        extra="forbid",
        pyproject_toml_table_header=("tool", "taskbridge"),
    )

    default_backend: str = Field(default="inprocess", min_length=1)
    """Backend alias for tasks whose decorator and routes name none."""
    routes: dict[str, str | dict[str, Any]] = Field(default_factory=dict)
    """Ordered glob on task name -> backend alias, or -> policy fields. First match wins and
    overrides the code's own policy."""
    backends: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Options per backend alias; `engine` picks the implementation when the alias is not one."""
    strict_arguments: bool = False
    """Check in-process tasks' arguments for JSON too, to find what would break on a queue."""
    dispatch_timeout: float = Field(default=5.0, gt=0)
    """Seconds a request waits for a broker to accept its calls before failing."""
    max_argument_bytes: int | None = Field(default=1_048_576, gt=0)
    """Largest JSON size of one call's arguments for a queue; None for no limit."""
    signing_key: SecretStr | None = Field(default=None, min_length=16)
    """Secret for HMAC-signing queued messages; workers then reject unsigned or altered ones."""
    unavailable_retry_after: int = Field(default=5, ge=0)
    """Retry-After (seconds) of the 503 answered when a broker did not accept a request's calls."""
    schedules: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Schedule name -> {task, cron | every, args, kwargs, enabled, timezone, missed}: adds
    schedules, or changes or disables (`{"enabled": false}`) those declared in code."""
    scheduler_url: str | None = None
    """Redis URL where schedulers elect a leader and claim slots, so that any number of them
    (and of API processes running in-process schedules) run each slot once."""
    scheduler_prefix: str = Field(default="taskbridge:", min_length=1)
    """Prefix of the schedulers' keys at `scheduler_url` (their lease, slot claims, cursors,
    on-startup claims): applications sharing one Redis for this give each its own."""
    scheduler_lease: float = Field(default=5.0, gt=0)
    """Seconds a scheduler's leadership lasts unless renewed: a standby takes over within it."""
    deployment_id: str | None = None
    """Identifies a deployment (a release, an image tag): on-startup calls run once per id.
    Unset, API processes starting within `startup_window` seconds of each other count as one
    start."""
    startup_window: float = Field(default=60.0, gt=0)
    """Seconds within which API processes starting together share one on-startup call."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (
            init_settings,
            env_settings,
            dotenv_settings,
            PyprojectTomlConfigSettingsSource(settings_cls),
            file_secret_settings,
        )


def load_settings(values: TaskBridgeSettings | Mapping[str, Any] | None) -> TaskBridgeSettings:
    """Build the settings; any invalid value is a ConfigurationError naming its variable."""
    if isinstance(values, TaskBridgeSettings):
        return values
    try:
        return TaskBridgeSettings(**dict(values or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{env_name(*err['loc'])}: {err['msg']}" for err in exc.errors())
        raise ConfigurationError(f"invalid taskbridge settings: {problems}") from None
    except SettingsError as exc:
        field = re.search(r'field "([^"]+)"', str(exc))
        name = env_name(field.group(1)) if field else "a setting"
        raise ConfigurationError(
            f"invalid taskbridge settings: {name} is not valid JSON ({exc})"
        ) from None
