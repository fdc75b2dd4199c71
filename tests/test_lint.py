"""pyflakes' checks over the tree, by ruff (`[tool.ruff]` in pyproject.toml): no unused import or
local, no undefined name, no f-string without a placeholder, ... in anything but generated code."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHECKED = ("server", "engines", "client", "bench", "tests", "scripts", "train", "proto")


def _ruff() -> Path:
    exe = Path(sys.executable).with_name("ruff")
    assert exe.exists(), f"{exe} is missing: install the dev extra (pip install -e '.[dev]', ruff)"
    return exe


def test_the_tree_passes_pyflakes_checks():
    done = subprocess.run([str(_ruff()), "check", "--no-cache", *CHECKED], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_check_finds_what_it_is_for(tmp_path):
    """The same configuration on a file with an unused import and an undefined name fails: the
    test above is not passing because nothing is checked."""
    probe = tmp_path / "probe.py"
    probe.write_text("import os\n\n\ndef f():\n    return undefined_name\n")
    done = subprocess.run([str(_ruff()), "check", "--no-cache", "--config", str(ROOT / "pyproject.toml"), str(probe)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "F401" in done.stdout and "F821" in done.stdout, done.stdout
