"""Virtual environments for the unmodified client packages the tests drive (nvidia-riva-client,
Pipecat's and LiveKit's NVIDIA speech services). Each pins its own protobuf/grpcio, so each
lives in its own environment, built once under .cache/ (git-ignored) from PyPI and reused by
later runs; a lock keeps two test runs from building one at the same time, and a marker file
written last says the build finished (a half-built environment is rebuilt).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
READY = ".nemostream-ready"  # written once the probe imports in the environment


def venv_place(env_var: str, name: str) -> Path:
    return Path(os.environ.get(env_var, ROOT / ".cache" / name))


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def build_venv(venv: Path, requirements: list[str], probe: str, timeout_s: float = 900) -> tuple[Path | None, str]:
    """The environment's python, or None and why not. `probe` is Python code run in the
    environment once installed; its output is kept in the ready marker (with the install time)."""
    try:
        venv.parent.mkdir(parents=True, exist_ok=True)
        lock = open(venv.parent / f"{venv.name}.lock", "w")
    except OSError as exc:
        return None, str(exc)
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        python = venv_python(venv)
        if (venv / READY).exists() and python.exists():
            return python, ""
        shutil.rmtree(venv, ignore_errors=True)
        started = time.monotonic()
        steps = ([sys.executable, "-m", "venv", str(venv)],
                 [str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *requirements],
                 [str(python), "-c", probe])
        for step in steps:
            try:
                done = subprocess.run(step, capture_output=True, text=True, timeout=timeout_s)
            except (OSError, subprocess.TimeoutExpired) as exc:
                return None, f"{' '.join(step[:4])}: {exc}"
            if done.returncode != 0:
                return None, f"{' '.join(step[:4])} failed: {(done.stderr or done.stdout).strip()[-600:]}"
        (venv / READY).write_text(f"{done.stdout.strip()}\ninstalled in {time.monotonic() - started:.0f} s\n")
        return python, ""
