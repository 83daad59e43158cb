"""The JSON job/result format: ARQ's own functions read and write it, and pickle is refused."""

from __future__ import annotations

import asyncio
import pickle
import re
import sys
import traceback
from pathlib import Path
from typing import Any

import pytest
from arq.jobs import (
    DeserializationError,
    SerializationError,
    deserialize_job,
    deserialize_job_raw,
    deserialize_result,
    serialize_job,
    serialize_result,
)
from arq.worker import JobExecutionFailed
from taskbridge_arq import (
    RemoteTaskError,
    deserialize,
    exception_from_json,
    exception_to_json,
    serialize,
)
from taskbridge_arq._serializer import MAX_TRACEBACK

from taskbridge import MessageError


class PlanLimitError(Exception):
    """An exception class of the client's own, importable here."""

    def __init__(self, message: str, *, plan: str) -> None:
        super().__init__(message)
        self.plan = plan


class NeedsInitError(Exception):
    """Its __str__ needs an attribute only __init__ sets, so it cannot be rebuilt safely."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code

    def __str__(self) -> str:
        return f"code {self.code}"


class Exploit:
    """Unpickling this creates a file: the side effect a pickled job could carry."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.path,))


def _raised(error: BaseException) -> BaseException:
    try:
        raise error
    except BaseException as caught:
        return caught


def _result_round_trip(error: BaseException) -> Any:
    raw = serialize_result(
        "fn", (1,), {}, 1, 1000, False, error, 1001, 1002, "ref", "q", "id", serializer=serialize
    )
    assert raw is not None
    return deserialize_result(raw, deserializer=deserialize).result


def test_a_job_written_with_arqs_serialize_job_reads_back_with_arqs_deserializers() -> None:
    raw = serialize_job("tasks.send", (1, "a"), {"to": "x@y"}, None, 1700, serializer=serialize)
    assert raw.startswith(b"{")
    job = deserialize_job(raw, deserializer=deserialize)
    assert (job.function, job.args, job.kwargs, job.job_try) == (
        "tasks.send",
        (1, "a"),
        {"to": "x@y"},
        None,
    )
    assert deserialize_job_raw(raw, deserializer=deserialize) == (
        "tasks.send",
        (1, "a"),
        {"to": "x@y"},
        None,
        1700,
    )


def test_a_successful_result_round_trips() -> None:
    raw = serialize_result(
        "fn",
        (),
        {},
        2,
        1000,
        True,
        {"n": [1, 2]},
        1001,
        1002,
        "ref",
        "q",
        "id",
        serializer=serialize,
    )
    assert raw is not None
    result = deserialize_result(raw, deserializer=deserialize)
    assert (result.success, result.result, result.job_try) == (True, {"n": [1, 2]}, 2)


def test_a_builtin_exception_comes_back_as_itself_with_the_remote_traceback() -> None:
    error = _result_round_trip(_raised(KeyError("missing")))
    assert type(error) is KeyError
    assert error.args == ("missing",)
    assert "Remote traceback" in error.__notes__[0]
    assert "raise error" in error.__notes__[0]


def test_an_importable_exception_comes_back_as_its_class_without_running_its_init() -> None:
    error = _result_round_trip(PlanLimitError("too many seats", plan="free"))
    assert type(error) is PlanLimitError
    assert str(error) == "too many seats"


def test_an_exception_that_cannot_be_rebuilt_becomes_remote_task_error() -> None:
    error = _result_round_trip(NeedsInitError(7))
    assert isinstance(error, RemoteTaskError)
    assert error.type_name.endswith("NeedsInitError")
    assert error.message == "code 7"


def test_a_class_whose_module_is_not_imported_is_not_imported_for_it() -> None:
    assert "mailbox" not in sys.modules  # an importable stdlib module nothing here uses
    error = exception_from_json({"exception": "mailbox.NoSuchMailboxError", "message": "nope"})
    assert isinstance(error, RemoteTaskError)
    assert (error.type_name, error.message) == ("mailbox.NoSuchMailboxError", "nope")
    assert "mailbox" not in sys.modules


@pytest.mark.parametrize(
    "name", ["builtins.SystemExit", "builtins.KeyboardInterrupt", "os.system", "builtins.len"]
)
def test_only_exception_classes_are_rebuilt(name: str) -> None:
    error = exception_from_json({"exception": name, "message": "x", "args": ["x"]})
    assert isinstance(error, RemoteTaskError)


def test_an_aborted_job_reads_as_cancelled_error() -> None:
    assert isinstance(_result_round_trip(asyncio.CancelledError()), asyncio.CancelledError)


def test_arqs_own_failures_come_back_typed() -> None:
    error = _result_round_trip(JobExecutionFailed("function 'x' not found"))
    assert type(error) is JobExecutionFailed
    assert error.args == ("function 'x' not found",)


def test_exception_args_that_are_not_json_are_replaced_by_the_message() -> None:
    error = _result_round_trip(ValueError(object()))
    assert type(error) is ValueError
    assert str(error).startswith("<object object at")


def test_non_json_values_are_refused_by_the_serializer() -> None:
    with pytest.raises(TypeError):
        serialize({"f": "x", "a": [], "k": {}, "t": None, "et": 1, "extra": object()})
    with pytest.raises(ValueError):
        serialize({"f": "x", "a": [float("nan")], "k": {}, "t": None, "et": 1})
    with pytest.raises(SerializationError):
        serialize_job("f", (object(),), {}, None, 1, serializer=serialize)


def test_a_pickled_job_is_refused_without_being_unpickled(tmp_path: Path) -> None:
    payload = pickle.dumps({"t": None, "f": "x", "a": [Exploit(tmp_path / "proof")], "k": {}})
    pickle.loads(payload)  # the payload is live: loading it does create the file
    assert (tmp_path / "proof").exists()

    payload = pickle.dumps({"t": None, "f": "x", "a": [Exploit(tmp_path / "marker")], "k": {}})
    with pytest.raises(MessageError, match="pickle"):
        deserialize(payload)
    with pytest.raises(DeserializationError):
        deserialize_job(payload, deserializer=deserialize)
    assert not (tmp_path / "marker").exists()


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"not json", "not valid JSON"),
        (b'{"t": null, "f": "x", "a": [1, 2', "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "not an object"),
        (b'{"f": "x", "a": [], "k": {}}', "'et'"),
        (b'{"f": 3, "a": {}, "k": [], "t": "1", "et": 1}', "'f' (function name)"),
    ],
)
def test_payloads_that_are_not_json_jobs_are_refused(payload: bytes, problem: str) -> None:
    with pytest.raises(MessageError, match=re.escape(problem)):
        deserialize(payload)


def test_a_result_stores_its_times_as_offsets_and_arq_reads_them_back() -> None:
    from arq.jobs import deserialize_result, serialize_result
    from taskbridge_arq import deserialize, serialize

    stored = serialize_result(
        "tb.record",
        (1,),
        {},
        1,
        1764517890000,
        True,
        None,
        1764517890123,
        1764517890125,
        "job-1:tb.record",
        "arq:q",
        "job-1",
        serializer=serialize,
    )
    assert stored is not None
    assert b'"sa":123' in stored and b'"fa":2' in stored and b'"st"' not in stored
    result = deserialize_result(stored, deserializer=deserialize)
    assert result.start_time.timestamp() * 1000 == 1764517890123
    assert result.finish_time.timestamp() * 1000 == 1764517890125
    assert result.enqueue_time.timestamp() * 1000 == 1764517890000


def _chained() -> None:
    try:
        raise RuntimeError("the cause: " + "é" * 20_000)  # about 40 KiB of UTF-8
    except RuntimeError as cause:
        raise ValueError("at the bottom") from cause


def test_a_failures_traceback_is_kept_to_its_last_16_kib_and_a_cancellations_is_not() -> None:
    try:
        _chained()
    except ValueError as exc:
        deep = exc
    data = exception_to_json(deep)
    kept = data["traceback"]
    whole = "".join(traceback.format_exception(deep)).encode()
    assert len(kept.encode()) <= MAX_TRACEBACK < len(whole)
    assert kept.startswith("[...]\n")
    assert kept.rstrip().endswith("ValueError: at the bottom")
    assert 'raise ValueError("at the bottom") from cause' in kept
    short = exception_to_json(_raised(KeyError("missing")))
    assert short["traceback"].startswith("Traceback (most recent call last):")
    assert "traceback" not in exception_to_json(_raised(asyncio.CancelledError()))
