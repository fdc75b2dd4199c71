#!/usr/bin/env bash
# The GPU suite in one command, on a GPU host (tests/gpu, pytest marker `gpu`):
#
#   bash scripts/gpu_suite.sh            # device tool: carry .whl (scripts/gpu_wheels.py) and .gpuspeech
#
# 1. installs the carried wheels (.whl/, and ../.whl/ when this tree sits inside another checkout)
#    into a temporary folder when NeMo, grpcio at the version proto/ demands, or pytest-asyncio are
#    missing;
# 2. runs `pytest -m gpu tests/gpu` (NEMO_STREAM_TEST_ORDER=reverse or shuffle-SEED reorders it;
#    EXTRA_TESTS adds test files, e.g. the CUDA-capable tests of the main suite; GPU_SUITE_TESTS
#    replaces tests/gpu, e.g. to run its files in a chosen order);
# 3. writes gpu_suite.json and gpu_suite.md to $OUT (default .gpu-suite/): the commit and dirty
#    flag (client/provenance.py), the machine, passed/failed/skipped, every test's outcome and
#    duration, and the figures the tests measured (token agreement, parity, OOM counts).
# Exit status: pytest's. Results of record: tests/gpu/RESULTS.md.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${OUT:-$ROOT/.gpu-suite}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/gpu-suite.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false

need=$(cat <<'EOF'
import sys
sys.path.insert(0, ".")
from scripts.gpu_wheels import _key, required_grpcio
import grpc, msgspec, nemo, pytest_asyncio  # noqa
assert _key(grpc.__version__.split("rc")[0]) >= _key(required_grpcio()), grpc.__version__
EOF
)
if ! "$PY" -c "$need" 2>/dev/null; then
    wheels=$(ls "$ROOT"/.whl/*.whl "$ROOT"/../.whl/*.whl 2>/dev/null | awk -F/ '!seen[$NF]++')
    if [ -z "$wheels" ]; then
        echo "gpu_suite: NeMo, grpcio, msgspec or pytest-asyncio missing and no .whl carried (python scripts/gpu_wheels.py --download .whl)" >&2
        exit 2
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" $wheels \
        || { echo "gpu_suite: installing the wheels failed" >&2; exit 2; }
    export PYTHONPATH="$WORK/site"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
"$PY" -c "$need" || { echo "gpu_suite: the packages are still not right" >&2; exit 2; }

export GPU_SUITE_FIGURES="$WORK/figures"
START=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# SUITE_BUDGET_S: the whole run's seconds; pytest is interrupted (SIGINT) when they are spent and
# still reports the tests it ran, so a device command limit never loses the whole result.
# tests/gpu/test_gpu_checkpoints.py runs once per model, each in its own pytest process: on the
# GPU host a second NeMo restore_from in one process failed (tests/gpu/RESULTS.md).
BUDGET=${SUITE_BUDGET_S:-3600}
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
: > "$OUT/gpu_suite.log"
CODE=0
run_pytest() {  # junit name, then pytest arguments
    local name=$1; shift
    [ "$(left)" -gt 5 ] || { echo "gpu_suite: no time left for $name" | tee -a "$OUT/gpu_suite.log"; CODE=124; return; }
    timeout -s INT "$(left)" "$PY" -m pytest -m gpu "$@" ${EXTRA_TESTS:-} -p no:cacheprovider -rA --durations=0 \
        --junitxml="$WORK/junit-$name.xml" ${PYTEST_ARGS:-} 2>&1 | tee -a "$OUT/gpu_suite.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || [ "$rc" = 5 ] || CODE=$rc
    EXTRA_TESTS=""  # once
}
if [ -n "${GPU_SUITE_TESTS:-}" ]; then
    run_pytest all $GPU_SUITE_TESTS
else
    run_pytest main tests/gpu --ignore=tests/gpu/test_gpu_checkpoints.py
    for model in $("$PY" -c "from bench.published_configs import PUBLISHED; print(' '.join(PUBLISHED))"); do
        GPU_CHECKPOINT_MODEL=$model run_pytest "checkpoint-$model" tests/gpu/test_gpu_checkpoints.py
    done
fi

"$PY" - "$WORK" "$GPU_SUITE_FIGURES" "$OUT" "$CODE" "$START" <<'EOF'
import json, os, platform, subprocess, sys, xml.etree.ElementTree as ET
from pathlib import Path
work, figures, out, code, start = sys.argv[1:6]
from client.provenance import describe, source_revision
import torch
tests, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
for junit in sorted(Path(work).glob("junit-*.xml")):
    for case in ET.parse(junit).getroot().iter("testcase"):
        if not case.get("name"):
            continue
        outcome = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                outcome = {"failure": "failed"}.get(tag, tag)
                detail = (node.get("message") or "")[:400]
                break
        else:
            detail = ""
        counts[outcome] += 1
        tests.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                      "seconds": round(float(case.get("time", 0)), 1), "detail": detail})
figs = {f.stem: json.loads(f.read_text()) for f in sorted(Path(figures).glob("*.json"))} if Path(figures).exists() else {}
try:
    gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True).stdout.strip()
except OSError:
    gpu = "none"
try:
    import nemo
    nemo_version = nemo.__version__
except ImportError:
    nemo_version = None
import grpc
rev = source_revision()
result = {"suite": "tests/gpu (pytest -m gpu)", "command": "bash scripts/gpu_suite.sh",
          "order": os.environ.get("NEMO_STREAM_TEST_ORDER") or "collection order",
          "extra_tests": os.environ.get("EXTRA_TESTS", ""),
          "tests_run": os.environ.get("GPU_SUITE_TESTS") or "tests/gpu (checkpoints: one process per model)",
          "budget_s": os.environ.get("SUITE_BUDGET_S"), "started": start, "exit_status": int(code),
          "revision": rev, "commit_line": describe(rev),
          "machine": {"gpu": gpu, "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                      "cuda": torch.version.cuda, "nemo": nemo_version, "grpcio": grpc.__version__},
          "counts": counts, "tests": tests, "figures": figs}
Path(out, "gpu_suite.json").write_text(json.dumps(result, indent=1))
lines = [f"# GPU suite: {counts['passed']} passed, {counts['failed']} failed, {counts['error']} errors, "
         f"{counts['skipped']} skipped", "",
         f"- commit {describe(rev)} (source {rev.get('source')}, tree sha256 {rev['tree_sha256'][:16]})",
         f"- machine: {gpu}; {os.cpu_count()} CPUs; torch {torch.__version__} (CUDA {torch.version.cuda}), "
         f"NeMo {nemo_version}, grpcio {grpc.__version__}, Python {platform.python_version()}",
         f"- command: `bash scripts/gpu_suite.sh`; order: {result['order']}; started {start}", "",
         "| test | outcome | s |", "|---|---|---|"]
lines += [f"| {t['test']} | {t['outcome']}{(': ' + t['detail'][:120].replace('|', '/')) if t['detail'] else ''} "
          f"| {t['seconds']} |" for t in tests]
lines += ["", "## Figures", ""] + [f"- {k}: `{json.dumps(v)[:600]}`" for k, v in figs.items()]
Path(out, "gpu_suite.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines[:4]))
EOF
exit "$CODE"
