"""The device-run scripts under bench/ and scripts/: each parses as bash (a device call is too
scarce to find a syntax error in), and bench/defaults_gpu.sh, the defaults-against-tuned
measurement, runs end to end on the CPU with builtin:tiny: two real servers in turn, a real
asr-loadgen level each, and its summary read from the reports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*ROOT.glob("bench/*.sh"), *ROOT.glob("scripts/*.sh")])


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.name for p in SCRIPTS])
def test_the_script_parses(script: Path):
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_defaults_against_tuned_runs_on_the_cpu(tmp_path: Path):
    env = dict(os.environ, OUT=str(tmp_path), PY=sys.executable, MODEL="builtin:tiny", DEVICE="cpu",
               DTYPE="float32", LEVELS="2", STREAM_S="3", WORKERS="1", BASELINE="0", TUNED_ARGS="--max-batch 4",
               BUDGET_S="300", C1_SECONDS="2")
    done = subprocess.run(["bash", "bench/defaults_gpu.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    log = (tmp_path / "pair.log").read_text()
    # both servers started, in the default order, the tuned one with its flags
    assert log.index("default server (flags: none) up") < log.index("tuned server (flags: --max-batch 4) up"), log
    levels = re.findall(r"c=2 done=(\d+) errors=(\{[^}]*\}) chunk p50=([\d.]+) p95=([\d.]+).* -> (PASS|FAIL)", log)
    assert len(levels) == 2, log
    for done_streams, errors, p50, p95, verdict in levels:
        assert done_streams == "2" and errors == "{}" and 0 < float(p50) <= float(p95), log
        assert verdict == ("PASS" if float(p95) <= 160 else "FAIL")
    # one stream alone on each server first (C1_SECONDS), then the levels
    alone = re.findall(r"c=1 done=(\d+) errors=\{\} chunk p50=([\d.]+)", log)
    assert [d for d, _ in alone] == ["1", "1"] and all(float(p50) > 0 for _, p50 in alone), log
    assert log.index("default c=1 (exit 0)") < log.index("default c=2 (exit 0)"), log
    assert len(re.findall(r"server cores [\d.]+ \(every process\), [\d.]+ per 1,000 streams", log)) == 4, log
    with tarfile.open(tmp_path / "pair.tgz") as tgz:
        names = set(tgz.getnames())
    assert {"./loadgen_default_1.json", "./loadgen_default_2.json", "./loadgen_tuned_2.json", "./server_default.log", "./server_tuned.log"} <= names
