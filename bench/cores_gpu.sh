#!/usr/bin/env bash
# Several engine cores under load (issue 18's GPU target: "a two-core run shows placement and
# per-core metrics under load"): one asr-server with CORES engine cores on DEVICE (one GPU:
# --engine-cores; several GPUs: GPUS=all uses --gpus), asr-loadgen at LEVELS, and each core's
# metrics (asr_core_*) and /health entry scraped at the busiest moment and after each level.
# Results in $OUT: cores_loadgen.json, metrics_<level>.txt (the asr_core_* lines), health_<level>.json,
# cores.log. Run from the repository root after installing the carried wheels (bench/README.md).
# Issue 19's several-GPU run: GPUS=all, and KILL_CORE=<index> KILL_LEVEL=<level> SIGKILLs that
# core's engine worker half-way through that level (its streams must end UNAVAILABLE, the other
# cores' streams untouched). At the end cores_summary.md tabulates every level (p95, errors by
# status, streams per core) and the capacity: the largest level with p95 chunk latency at most
# the lookahead and no error. PACK=1 leaves only cores_run.tgz and cores_summary.md in $OUT
# (the device tool returns a few files per call).
set -u
OUT=${OUT:-/tmp/cores_out}; mkdir -p "$OUT"
PY=${PY:-python3}
MODEL=${MODEL:-builtin:nemotron-0.6b}; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-float16}; ENGINE=${ENGINE:-fast-cudagraph}
CORES=${CORES:-2}; GPUS=${GPUS:-}; LOOKAHEAD=${LOOKAHEAD:-160}; LEVELS=${LEVELS:-1,256,512}
MAX_STREAMS=${MAX_STREAMS:-1024}; MAX_BATCH=${MAX_BATCH:-256}; WORKERS=${WORKERS:-8}; SECS=${SECS:-20}
KILL_CORE=${KILL_CORE:-}; KILL_LEVEL=${KILL_LEVEL:-}; PACK=${PACK:-}
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
    if [ -n "$KILL_CORE" ] && [ "$lv" = "$KILL_LEVEL" ]; then
        ( sleep $(( SECS / 2 + 3 )); scrape "during_$lv"
          kpid=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['cores'][int(sys.argv[2])]['pid'])" \
                 "$OUT/health_during_$lv.json" "$KILL_CORE")
          echo "== level $lv: SIGKILL core $KILL_CORE (engine worker pid $kpid)" >> "$LOG"
          kill -KILL "$kpid" ) &
    else
        ( sleep $(( SECS / 2 + 3 )); scrape "during_$lv" ) &
    fi
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
"$PY" - "$OUT" "$LEVELS" "$LOOKAHEAD" <<'PYEOF' > "$OUT/cores_summary.md"
import json, os, sys
out, levels, lookahead = sys.argv[1], sys.argv[2].split(","), float(sys.argv[3])
print("| streams | done | errors | chunk p50 / p95 ms | final p95 ms | streams per core (half-way) | cores after |")
print("|---|---|---|---|---|---|---|")
capacity = 0
for lv in levels:
    try:
        level = json.load(open(os.path.join(out, f"cores_loadgen_{lv}.json")))["levels"][0]
    except (OSError, KeyError, IndexError, ValueError):
        print(f"| {lv} | no report | | | | | |"); continue
    def cores(name):
        try:
            return json.load(open(os.path.join(out, f"health_{name}_{lv}.json"))).get("cores", [])
        except (OSError, ValueError):
            return []
    per_core = " / ".join(str(c.get("active_streams")) for c in cores("during"))
    after = " / ".join(c.get("state", "?") for c in cores("after"))
    chunk, final = level.get("chunk_latency_ms", {}), level.get("final_latency_ms", {})
    errors = level.get("errors", {})
    print(f"| {lv} | {level.get('streams_completed')}/{level.get('streams_requested')} | "
          f"{json.dumps(errors) if errors else 0} | {chunk.get('p50')} / {chunk.get('p95')} | {final.get('p95')} | "
          f"{per_core} | {after} |")
    if not errors and chunk.get("p95") is not None and chunk["p95"] <= lookahead:
        capacity = max(capacity, int(lv))
print(f"\ncapacity (p95 chunk latency <= {lookahead:g} ms, no error): {capacity} streams")
PYEOF
cat "$OUT/cores_summary.md" >> "$LOG"
if [ -n "$PACK" ]; then
    tar czf "$OUT/cores_run.tgz" -C "$OUT" --exclude cores_run.tgz --exclude cores_summary.md . \
        && find "$OUT" -maxdepth 1 -type f ! -name cores_run.tgz ! -name cores_summary.md -delete
fi
