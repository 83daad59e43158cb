"""The one way into a worker: a native message, mapped to an `Envelope`, becomes a `ReadyCall`.

Every worker (Celery, ARQ, a third party's) maps what its engine delivered to an Envelope, with
nothing checked, and hands it to `Receiver.receive`, which:

1. checks the shape (an id, a registered task name, a list of args, a map of kwargs);
2. verifies the signature, when the bridge has a `signing_key`, over everything that changes
   what runs or how: id, task name, args, kwargs, the carried policy (retries, backoff,
   timeout) and the engine's own fields that do (time limits, due time, retry count), which
   the plugin passes as `engine`;
3. binds the arguments to the task's signature;
4. validates the carried policy on top of the worker's own resolution of the task.

It returns a ReadyCall for the runner, or raises MessageError (UnknownTaskError for a task not
registered here) naming the task, the id and what was wrong. A worker then rejects the message
(acks it, records it failed where it has an id) and keeps running.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field, replace
from operator import itemgetter
from typing import TYPE_CHECKING, Any

from ._exceptions import ConfigurationError, MessageError
from ._policy import EXECUTION_FIELDS, Policy, with_execution_fields

if TYPE_CHECKING:
    from ._backends import WorkerBridge
    from ._signing import Signer
    from ._task import Task

__all__ = ["Envelope", "ReadyCall", "Receiver"]

_MAX_CACHED_POLICIES = 256
"""Distinct (task, carried policy) pairs remembered (callers rarely use more than a few)."""
_MAX_CACHED_SHAPES = 1024
"""Distinct (task, number of args, keyword names) shapes whose binding is remembered."""

_EXECUTION = frozenset(EXECUTION_FIELDS)
_all_execution_fields = itemgetter(*EXECUTION_FIELDS)
"""The carried execution fields as a tuple; KeyError when one is left out."""


@dataclass(frozen=True, slots=True)
class Envelope:
    """A queued call as a worker received it; nothing in it is trusted yet.

    `policy` is the dispatcher's execution policy as carried (None: the worker's own, as for a
    message sent with the engine's own API). `engine` holds the engine's fields that change
    behaviour (Celery: time limits, eta, expires, retries), in a canonical JSON form both sides
    compute alike; the signature covers them.
    """

    id: object
    task: object
    args: object
    kwargs: object
    policy: object = None
    engine: Mapping[str, Any] = field(default_factory=dict)
    signature: object = None
    trace: object = None


@dataclass(frozen=True, slots=True)
class ReadyCall:
    """A checked call, ready for the runner."""

    id: str
    task: Task[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    policy: Policy
    trace: dict[str, Any] | None


PolicyHook = Callable[["Task[..., Any]", Policy], Policy]
"""Applied to each execution policy after validation (e.g. ARQ caps the timeout)."""


class Receiver:
    """Turns envelopes into ready calls for the tasks of one bridge, on one backend alias."""

    def __init__(
        self,
        bridge: WorkerBridge,
        alias: str,
        *,
        carried_defaults: Mapping[str, Any] | None = None,
        adjust_policy: PolicyHook | None = None,
    ) -> None:
        """`carried_defaults`: the values of execution fields a carried policy leaves out (a
        plugin that sends only the fields differing from `Policy()`'s); without it, a field
        left out keeps the worker's own value. `adjust_policy` is applied to each result."""
        self.bridge = bridge
        self.alias = alias
        self.signer: Signer | None = bridge.signer
        self._defaults = dict(carried_defaults or {})
        self._adjust = adjust_policy
        self._policies: dict[Hashable, tuple[Task[..., Any], Policy]] = {}
        self._shapes: dict[tuple[str, int, tuple[str, ...]], tuple[Task[..., Any], str | None]] = {}

    def receive(self, envelope: Envelope) -> ReadyCall:
        """Check `envelope` (see the module's docstring); a ReadyCall or MessageError."""
        task_id, name = envelope.id, envelope.task
        if not isinstance(name, str) or not name:
            raise MessageError(f"a message for a task {name!r} [{task_id!r}] has no task name")
        if not isinstance(task_id, str) or not task_id:
            raise MessageError(f"a message for task {name!r} has no id (got {task_id!r})")
        task = self.bridge.get_task(name)  # UnknownTaskError for a task not registered here
        args, kwargs = envelope.args, envelope.kwargs
        if not isinstance(args, list | tuple):
            raise self._error(name, task_id, f"its args are a {type(args).__name__}, not a list")
        if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
            raise self._error(name, task_id, "its kwargs are not a map of names to values")
        if self.signer is not None:
            self.signer.verify(
                envelope.signature,
                task_id,
                name,
                args,
                kwargs,
                policy=envelope.policy,
                engine=envelope.engine,
            )
        problem = self.binding_problem(task, len(args), tuple(kwargs))
        if problem is not None:
            raise self._error(name, task_id, f"its arguments do not fit the task: {problem}")
        policy = self.policy(task, envelope.policy, task_id)
        trace = envelope.trace if isinstance(envelope.trace, dict) else None
        return ReadyCall(task_id, task, tuple(args), kwargs, policy, trace)

    def binding_problem(
        self, task: Task[..., Any], positional: int, names: tuple[str, ...]
    ) -> str | None:
        """Why `positional` arguments and keyword arguments `names` do not bind to `task`'s
        signature (`inspect.Signature.bind`'s message), or None when they do.

        Cached per task and shape: binding depends on how many arguments there are and on the
        keyword names, never on the values.
        """
        key = (task.name, positional, names)
        try:
            found = self._shapes[key]
        except KeyError:
            pass
        else:
            if found[0] is task:
                return found[1]
        try:
            task.signature.bind(*range(positional), **dict.fromkeys(names))
        except TypeError as exc:
            problem: str | None = str(exc)
        else:
            problem = None
        if len(self._shapes) < _MAX_CACHED_SHAPES:
            self._shapes[key] = (task, problem)
        return problem

    def policy(self, task: Task[..., Any], carried: object, task_id: str = "?") -> Policy:
        """The execution policy of a call of `task`: the worker's resolution of the task (which
        gives `retry_on`: exception classes cannot travel) with the carried fields applied.

        Cached per (task, carried execution fields, with their types): validating costs more
        than a short task's run. Other carried keys are ignored, as validation ignores them.
        """
        key: Hashable
        if carried is None:
            key = (task.name, None)
        elif type(carried) is dict:
            try:
                values = _all_execution_fields(carried)
                key = (task.name, values, tuple(map(type, values)))
            except KeyError:  # some fields left out (sent only when not the default)
                key = (
                    task.name,
                    tuple([(k, type(v), v) for k, v in carried.items() if k in _EXECUTION]),
                )
        else:  # not a plain map: validate, which says why (or takes a Mapping as it is)
            return self._build_policy(task, carried, task_id)
        try:
            found = self._policies[key]
        except TypeError:  # a value that is a list or a map: not a valid field anyway
            return self._build_policy(task, carried, task_id)
        except KeyError:
            policy = self._build_policy(task, carried, task_id)
            if len(self._policies) < _MAX_CACHED_POLICIES:
                self._policies[key] = (task, policy)
            return policy
        if found[0] is not task:  # another task registered under that name since
            policy = self._build_policy(task, carried, task_id)
            self._policies[key] = (task, policy)
            return policy
        return found[1]

    def _build_policy(self, task: Task[..., Any], carried: object, task_id: str) -> Policy:
        policy = self.bridge.resolve(task).policy
        if carried is not None:
            if not isinstance(carried, Mapping):
                raise self._error(
                    task.name, task_id, f"its policy is a {type(carried).__name__}, not a map"
                )
            try:
                policy = with_execution_fields(policy, {**self._defaults, **carried})
            except ConfigurationError as exc:
                raise self._error(task.name, task_id, f"its policy is invalid: {exc}") from None
        policy = replace(policy, backend=self.alias)
        return policy if self._adjust is None else self._adjust(task, policy)

    @staticmethod
    def _error(name: str, task_id: str, problem: str) -> MessageError:
        return MessageError(f"message for task {name!r} [{task_id}] rejected: {problem}")
