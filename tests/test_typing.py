"""Static typing: decorated tasks keep their signatures (checked by mypy --strict)."""

from __future__ import annotations

from pathlib import Path

import pytest

api = pytest.importorskip("mypy.api")
HERE = Path(__file__).parent / "typing"


def _mypy(name: str) -> tuple[str, int]:
    stdout, stderr, status = api.run(
        ["--strict", "--no-incremental", "--cache-dir=/dev/null", str(HERE / name)]
    )
    return stdout + stderr, status


def test_assert_type_on_tasks_and_add_task_passes_mypy_strict() -> None:
    output, status = _mypy("check_types.py")
    assert status == 0, output


def test_wrong_arguments_are_type_errors() -> None:
    output, status = _mypy("wrong_types.py")
    assert status == 1
    errors = [line for line in output.splitlines() if ": error:" in line]
    assert [int(line.split(":")[1]) for line in errors] == [16, 17, 18, 19, 22], output
