"""Layering: one import direction, checked by import-linter; generated code matches the .proto.

The contracts live in pyproject.toml ([tool.importlinter]): engines/ is the only code that
imports torch/NeMo/ONNX Runtime/TensorRT, engines/ never imports server/ or client/, client/
never imports server/ or engines/, the scheduling core knows no gRPC or protobuf, server/'s
sub-packages sit in layers (service -> runtime -> transport -> ops -> scheduling) and each
sub-package's modules in layers of their own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _lint_imports() -> Path:
    """The `lint-imports` of this interpreter's environment (the dev extra installs it)."""
    exe = Path(sys.executable).with_name("lint-imports")
    assert exe.exists(), f"{exe} is missing: install the dev extra (pip install -e '.[dev]', import-linter)"
    return exe


def test_import_contracts_are_kept():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([str(_lint_imports()), "--no-cache", "--no-logo"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    # The contracts really ran: all of pyproject.toml's contracts are reported kept.
    declared = (ROOT / "pyproject.toml").read_text().count("[[tool.importlinter.contracts]]")
    assert declared >= 7
    assert re.search(rf"Contracts: {declared} kept, 0 broken", done.stdout), done.stdout


def test_server_and_client_import_no_torch_at_run_time():
    """What import-linter cannot see: it reads our code, not our dependencies'. Importing the
    server and client must not pull torch in through a third-party package either."""
    code = ("import sys; import server.service.app, server.service.cli, server.service.frontends, "
            "server.transport.servicer, server.scheduling.scheduler, server.runtime.engine_worker, "
            "client.sdk, client.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nemo', 'onnxruntime', 'tensorrt')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_generated_code_matches_the_proto():
    done = subprocess.run([sys.executable, "proto/generate.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
