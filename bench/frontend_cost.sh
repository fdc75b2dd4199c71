#!/usr/bin/env bash
# A gRPC frontend's CPU per chunk (issue 17): asr-server --frontends 2 on the fake engine (10 ms
# steps, 6 tokens a chunk, as the random-weight nemotron-0.6b emits), asr-loadgen holding N
# real-time streams of 160 ms chunks for 20 s; the frontends' cores (from the load generator's
# report, /proc of each frontend process) over the chunks answered. Several source trees are run
# alternately (a git worktree at each commit), so they see the same machine noise.
#   bash bench/frontend_cost.sh 300 3 OLD_TREE NEW_TREE     # streams, rounds, trees
set -uo pipefail
N=${1:-300}; ROUNDS=${2:-3}; shift 2 || true
TREES=("${@:-$PWD}")
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-$ROOT/.venv/bin/python}
PORT=${PORT:-50079}; MPORT=${MPORT:-9479}
OUTJ=$(mktemp /tmp/frontend_cost.XXXXXX.json)
for round in $(seq 1 "$ROUNDS"); do
  for tree in "${TREES[@]}"; do
    (cd "$tree" && FAKE_ENGINE_STEP_DELAY_S=0.01 FAKE_ENGINE_TOKENS_PER_CHUNK=6 PYTHONPATH="$tree" exec "$PY" -m server.service.cli \
        --engine-factory tests.fake_engine:build_fake_engine --frontends 2 --port "$PORT" --metrics-port "$MPORT" \
        --max-streams $((N + 64)) --max-batch 256 > /tmp/frontend_cost_server.log 2>&1) &
    SERVER=$!
    for _ in $(seq 1 60); do grep -q "listening on" /tmp/frontend_cost_server.log && break; sleep 0.5; done
    timeout 120 "$PY" -m client.loadgen --server "127.0.0.1:$PORT" --concurrency "$N" --workers 1 --ramp-s 2 \
        --synthetic-seconds 20 --stream-seconds 20 --metrics-url "http://127.0.0.1:$MPORT/metrics" \
        --server-pid "$SERVER" --json "$OUTJ" --quiet > /dev/null 2>&1
    kill "$SERVER" 2>/dev/null; wait "$SERVER" 2>/dev/null
    "$PY" - "$N" "$tree" "$OUTJ" <<'PY'
import json, sys
n, tree, path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
level = json.load(open(path))["levels"][0]
proc = level["server_process"]
chunks = n / 0.16
frontends = sum(f["cores"] for f in proc.get("frontends", []))
print(f"{tree}: {n} streams, frontends {frontends:.3f} cores = {1e6 * frontends / chunks:.1f} us per chunk; "
      f"engine process {proc['cores']:.3f} cores; errors {len(level.get('errors') or [])}", flush=True)
PY
  done
done
rm -f "$OUTJ"
