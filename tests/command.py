"""Run the `taskbridge` command as users do: a subprocess, in a directory holding the app."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def run_taskbridge(
    directory: Path, modules: dict[str, str], *args: str, **env: str
) -> subprocess.CompletedProcess[str]:
    """Write `modules` (name -> source) into `directory`, then run `taskbridge *args` there with
    no TASKBRIDGE_ setting from this environment, only those in `env`."""
    for name, source in modules.items():
        (directory / f"{name}.py").write_text(source)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("TASKBRIDGE_")}
    return subprocess.run(
        [sys.executable, "-m", "taskbridge.cli", *args],
        cwd=directory,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
