#!/usr/bin/env bash
# Several engine cores under load (issue 18's GPU target: "a two-core run shows placement and
# per-core metrics under load"): one asr-server with CORES engine cores on DEVICE (one GPU:
# --engine-cores; several GPUs: GPUS=all uses --gpus), asr-loadgen at LEVELS, and each core's
# metrics (asr_core_*) and /health entry scraped at the busiest moment and after each level.
# Results in $OUT: cores_loadgen.json, metrics_<level>.txt (the asr_core_* lines), health_<level>.json,
# cores.log. Run from the repository root after installing the carried wheels (bench/README.md).
set -u
OUT=${OUT:-/tmp/cores_out}; mkdir -p "$OUT"
PY=${PY:-python3}
MODEL=${MODEL:-builtin:nemotron-0.6b}; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-float16}; ENGINE=${ENGINE:-fast-cudagraph}
CORES=${CORES:-2}; GPUS=${GPUS:-}; LOOKAHEAD=${LOOKAHEAD:-160}; LEVELS=${LEVELS:-1,256,512}
MAX_STREAMS=${MAX_STREAMS:-1024}; MAX_BATCH=${MAX_BATCH:-256}; WORKERS=${WORKERS:-8}; SECS=${SECS:-20}
LOG=$OUT/cores.log
placement=(--engine-cores "$CORES" --device "$DEVICE")
[ -n "$GPUS" ] && placement=(--gpus "$GPUS")
"$PY" -m client.provenance >> "$LOG" 2>&1
. "$(dirname "$0")/server_start.sh"
start_server "$OUT/server.log" --model "$MODEL" --engine "$ENGINE" "${placement[@]}" --dtype "$DTYPE" \
    --lookahead-ms "$LOOKAHEAD" --max-streams "$MAX_STREAMS" --max-batch "$MAX_BATCH" --log-level WARNING \
    ${SERVER_ARGS:-} 2>> "$LOG" || { echo "server did not start" >> "$LOG"; exit 1; }
spid=$SPID port=$PORT mport=$MPORT
grep -E "sizing|core" "$OUT/server.log" >> "$LOG"
scrape() {  # $1: name
    "$PY" - "$mport" "$OUT/metrics_$1.txt" "$OUT/health_$1.json" <<'PYEOF'
import sys, urllib.request
port, metrics_out, health_out = sys.argv[1:]
base = f"http://127.0.0.1:{port}"
text = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
open(metrics_out, "w").write("".join(l + "\n" for l in text.splitlines() if l.startswith("asr_core_")))
try:
    health = urllib.request.urlopen(base + "/health", timeout=10).read().decode()
except Exception as exc:  # a 503 still carries the JSON
    health = exc.read().decode() if hasattr(exc, "read") else str(exc)
open(health_out, "w").write(health)
PYEOF
}
IFS=, read -ra levels <<< "$LEVELS"
for lv in "${levels[@]}"; do
    # the busiest moment: half-way through the level's streams
    ( sleep $(( SECS / 2 + 3 )); scrape "during_$lv" ) &
    scraper=$!
    "$PY" -m client.loadgen --server "127.0.0.1:$port" --metrics-url "http://127.0.0.1:$mport/metrics" \
        --concurrency "$lv" --synthetic-clips 16 --synthetic-seconds "$SECS" --workers "$WORKERS" --ramp-s 2 \
        --cooldown-s 1 --server-pid $spid --json "$OUT/cores_loadgen_$lv.json" --label "cores $CORES $LOOKAHEAD ms" >> "$LOG" 2>&1
    wait $scraper
    scrape "after_$lv"
    { echo "== level $lv: per-core streams half-way through, and steps/batches so far"
      grep -E "asr_core_(active_streams|slots_in_use|up)\{" "$OUT/metrics_during_$lv.txt"
      grep -E "asr_core_(step_seconds|batch_size)_(count|sum)\{" "$OUT/metrics_after_$lv.txt"; } >> "$LOG"
done
kill -TERM $spid; wait $spid
echo "server exit $?" >> "$LOG"
