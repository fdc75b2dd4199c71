"""Layering: the server and client never import torch; generated code matches the .proto."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_server_and_client_modules_do_not_import_torch():
    code = ("import sys; import server.app, server.cli, server.scheduler, server.servicer, client.sdk, client.cli; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'nemo', 'onnxruntime', 'tensorrt')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_scheduler_imports_no_grpc():
    code = ("import sys; import server.scheduler; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('grpc', 'google', 'proto')); "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr


def test_generated_code_matches_the_proto():
    done = subprocess.run([sys.executable, "proto/generate.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
