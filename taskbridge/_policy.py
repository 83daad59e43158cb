"""Task policies: what a task asks of the backend that runs it, and where each choice came from."""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from ._exceptions import ConfigurationError

__all__ = [
    "POLICY_FIELDS",
    "OnUnavailable",
    "Policy",
    "PolicyFields",
    "ResolvedPolicy",
    "check_policy_fields",
]

OnUnavailable = Literal["fail", "inprocess"]


@dataclass(frozen=True, slots=True)
class Policy:
    """The effective policy of a task call: every field has a value."""

    backend: str = "inprocess"
    """Alias of the backend that runs the task (a key of the `backends` setting or a built-in)."""
    queue: str | None = None
    """Queue name on the engine; None uses the backend's default queue."""
    retries: int = 0
    """How many times a failed call is tried again (so at most `retries + 1` attempts)."""
    retry_backoff: float = 1.0
    """Delay before the first retry, in seconds; doubled on each attempt."""
    retry_backoff_max: float = 300.0
    """Upper bound of the retry delay, in seconds."""
    retry_jitter: bool = True
    """Randomise each delay between half and all of its value, so retries do not stampede."""
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    """Exception types that are retried; anything else fails at once."""
    timeout: float | None = None
    """Seconds an attempt may run; None is no limit."""
    delay: float | None = None
    """Seconds to wait before the call may start; None starts as soon as possible."""
    on_unavailable: OnUnavailable = "fail"
    """What to do when the backend cannot accept the call: fail the request or run it in-process."""
    key: str | None = None
    """Idempotency key (per call, via `.using(key=...)`): a second dispatch of the same task with
    the same key within `key_ttl` is a no-op that returns the first call's handle."""
    key_ttl: float = 86400.0
    """Seconds an idempotency key is remembered."""

    def retry_delay(self, attempt: int) -> float:
        """Seconds to wait after attempt `attempt` (1-based) failed, before the next one."""
        delay: float = min(self.retry_backoff * 2.0 ** (attempt - 1), self.retry_backoff_max)
        if self.retry_jitter:
            delay = random.uniform(delay / 2, delay)
        return delay

    def should_retry(self, error: BaseException, attempt: int) -> bool:
        """Whether a call whose attempt `attempt` (1-based) raised `error` is tried again."""
        return attempt <= self.retries and isinstance(error, self.retry_on)


POLICY_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(Policy))
EXECUTION_FIELDS = ("retries", "retry_backoff", "retry_backoff_max", "retry_jitter", "timeout")


def execution_fields(policy: Policy) -> dict[str, Any]:
    """The fields that govern execution, as JSON, to travel with a queued message.

    The dispatching side decides the policy (settings route > `.using()` > decorator), so a
    worker applies what the message carries rather than re-resolving it.
    """
    return {name: getattr(policy, name) for name in EXECUTION_FIELDS}


def with_execution_fields(policy: Policy, carried: Mapping[str, Any]) -> Policy:
    """`policy` updated with the execution fields a message carried; unknown keys are ignored."""
    known = {k: v for k, v in carried.items() if k in EXECUTION_FIELDS}
    checked = check_policy_fields(known, "a message's policy")
    return replace(policy, **checked) if checked else policy


class PolicyFields(BaseModel):
    """The policy fields a decorator, `.using()` or a settings route may set; all optional."""

    model_config = ConfigDict(extra="forbid", frozen=True, arbitrary_types_allowed=True)

    backend: str | None = Field(default=None, min_length=1)
    queue: str | None = Field(default=None, min_length=1)
    retries: int | None = Field(default=None, ge=0)
    retry_backoff: float | None = Field(default=None, ge=0)
    retry_backoff_max: float | None = Field(default=None, ge=0)
    retry_jitter: bool | None = None
    retry_on: tuple[type[BaseException], ...] | None = None
    timeout: float | None = Field(default=None, gt=0)
    delay: float | None = Field(default=None, ge=0)
    on_unavailable: OnUnavailable | None = None
    key: str | None = Field(default=None, min_length=1, max_length=200)
    key_ttl: float | None = Field(default=None, gt=0)

    @field_validator("retry_on", mode="before")
    @classmethod
    def _one_type_is_a_tuple(cls, value: Any) -> Any:
        if isinstance(value, type):
            return (value,)
        return value


def check_policy_fields(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Validate policy overrides; return only the fields that were given.

    `where` names the origin for the error message (a decorator, `.using()`, a settings route).
    """
    try:
        model = PolicyFields.model_validate(dict(values))
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or 'value'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigurationError(
            f"invalid policy in {where}: {problems} (policy fields: {', '.join(POLICY_FIELDS)})"
        ) from None
    return {name: getattr(model, name) for name in model.model_fields_set}


@dataclass(frozen=True, slots=True)
class ResolvedPolicy:
    """A policy together with the origin of each field (decorator, using, route, default)."""

    policy: Policy
    sources: Mapping[str, str]

    @classmethod
    def from_layers(cls, layers: list[tuple[str, Mapping[str, Any]]]) -> ResolvedPolicy:
        """Fold layers given lowest precedence first; a later layer's fields win."""
        values: dict[str, Any] = {}
        sources = dict.fromkeys(POLICY_FIELDS, "default")
        for source, layer in layers:
            for name, value in layer.items():
                values[name] = value
                sources[name] = source
        return cls(Policy(**values), sources)
