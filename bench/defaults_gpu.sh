#!/usr/bin/env bash
# Issue 17's "defaults within 10% of tuned", measured on one host in one device call: servers
# started in turn (one at a time, nothing else running beside a measurement), each carrying the
# same fixed levels of real-time streams of STREAM_S seconds at one lookahead, so the two
# configurations meet the same host, the same load and the same clips:
#   default: asr-server --model builtin:nemotron-0.6b --dtype float16 --device cuda (no sizing flag)
#   tuned:   the same with TUNED_ARGS (the best tuned flags found: run 43's)
# ORDER ("default tuned") says which server goes first; each level's p95 chunk latency against
# the lookahead says which levels each passes. NeMo's CacheAwareRNNTPipeline runs first at the
# same lookahead (RTFx in the log: how fast this host is, beside runs on other hosts).
# Results: $OUT/pair.log (the summary) and $OUT/pair.tgz (server logs, loadgen JSON).
#   OUT=... LOOKAHEAD=160 LEVELS="4096 4506" bash bench/defaults_gpu.sh
# Knobs: PY, MODEL, DEVICE, DTYPE (a CPU smoke: builtin:tiny cpu float32), LOOKAHEAD, LEVELS, STREAM_S, WORKERS, TUNED_ARGS, ORDER, BASELINE (0: skip), BUDGET_S,
# C1_SECONDS (a stream of that many seconds alone on each server before its levels; 0: none).
set -u
cd "$(dirname "$0")/.."
FINAL=${OUT:-/tmp/defaults_out}; mkdir -p "$FINAL"
OUT=$(mktemp -d /tmp/defaults.XXXXXX)
PY=${PY:-python3}
LOOKAHEAD=${LOOKAHEAD:-160}; LEVELS=${LEVELS:-4096}; STREAM_S=${STREAM_S:-60}; WORKERS=${WORKERS:-8}
TUNED_ARGS=${TUNED_ARGS:---step-kernels triton --max-batch 1024}
MODEL=${MODEL:-builtin:nemotron-0.6b}; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-float16}
ORDER=${ORDER:-default tuned}; BASELINE=${BASELINE:-1}; BUDGET_S=${BUDGET_S:-560}; C1_SECONDS=${C1_SECONDS:-0}
LOG=$OUT/pair.log
note() { echo "[pair +${SECONDS}s] $*" | tee -a "$LOG"; }
left() { echo $(( BUDGET_S - SECONDS )); }
{ "$PY" -m client.provenance; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; nproc; } >> "$LOG" 2>&1

if [ "$BASELINE" = 1 ] && [ -f .devbench/nemo_pipeline_baseline.py ]; then
    [ -f .devbench/tok/tokenizer.model ] || "$PY" .devbench/make_tokenizer.py >> "$OUT/baseline.txt" 2>&1
    case $LOOKAHEAD in 160) ctx=70,1 ;; 560) ctx=70,6 ;; *) ctx=70,1 ;; esac
    timeout 120 "$PY" .devbench/nemo_pipeline_baseline.py 24 1024 cuda float16 256 10 "$ctx" 256 > "$OUT/baseline.txt" 2>&1
    note "NeMo pipeline ($LOOKAHEAD ms, float16, batch 256): $(grep '^{' "$OUT/baseline.txt" | tail -1)"
fi

# One level: c streams of secs seconds from `workers` loadgen processes, against the running
# server; its line in the summary.
level() {
    local cfg=$1 c=$2 secs=$3 workers=$4
    timeout $(( secs + 60 )) "$PY" -m client.loadgen --server "127.0.0.1:$PORT" \
        --metrics-url "http://127.0.0.1:$MPORT/metrics" --server-pid "$SPID" --concurrency "$c" \
        --synthetic-clips 16 --synthetic-seconds 6 --stream-seconds "$secs" --ramp-s 2 --cooldown-s 1 \
        --level-grace-s 20 --workers "$workers" --json "$OUT/loadgen_${cfg}_$c.json" > "$OUT/loadgen_${cfg}_$c.txt" 2>&1
    note "$cfg c=$c (exit $?):"
    "$PY" - "$OUT/loadgen_${cfg}_$c.json" "$LOOKAHEAD" <<'EOF' 2>&1 | tee -a "$LOG"
import json, sys
doc = json.load(open(sys.argv[1]))
target = float(sys.argv[2])
for lv in doc.get("levels", []):
    lat, sm = lv.get("chunk_latency_ms") or {}, lv.get("server_metrics") or {}
    p95, errs = lat.get("p95"), lv.get("errors") or {}
    ok = p95 is not None and p95 <= target and not errs and lv.get("streams_completed") == lv.get("concurrency")
    phases = {k: round(v, 2) for k, v in (sm.get("phase_ms_mean") or {}).items()}
    print(f"  c={lv.get('concurrency')} done={lv.get('streams_completed')} errors={errs} chunk p50={lat.get('p50')} "
          f"p95={p95} mean batch={sm.get('mean_batch')} step ms={sm.get('mean_step_ms')} "
          f"busy={sm.get('engine_busy_fraction')} frontends={sm.get('frontend_streams')} -> {'PASS' if ok else 'FAIL'}")
    print(f"  server-side p50/p95 ms: engine core {sm.get('server_chunk_latency_ms_p50')}/"
          f"{sm.get('server_chunk_latency_ms_p95')}, written by the frontends {sm.get('server_chunk_written_ms_p50')}/"
          f"{sm.get('server_chunk_written_ms_p95')}")
    cores = (lv.get("server_process") or {}).get("cores_all_processes") or float("nan")
    done = lv.get("streams_completed") or 0
    print(f"  phases ms: {phases}; server cores {cores:.2f} (every process), "
          f"{1000 * cores / done if done else float('nan'):.2f} per 1,000 streams")
EOF
    cp "$LOG" "$FINAL/pair.log"  # the summary so far, should the call be cut off before the end
}

. bench/server_start.sh
for cfg in $ORDER; do
    args=""; [ "$cfg" = tuned ] && args=$TUNED_ARGS
    [ "$(left)" -gt $(( STREAM_S + 70 )) ] || { note "$cfg: not started (time)"; continue; }
    # shellcheck disable=SC2086
    start_server "$OUT/server_$cfg.log" --model "$MODEL" --dtype "$DTYPE" --device "$DEVICE" \
        --lookahead-ms "$LOOKAHEAD" --log-level WARNING $args 2>> "$LOG" || { note "$cfg: the server did not start"; continue; }
    note "$cfg server (flags: ${args:-none}) up: $(grep -h "sizing\|step kernels" "$OUT/server_$cfg.log" | head -3 | tr '\n' ' ')"
    if [ "$C1_SECONDS" -gt 0 ] && [ "$(left)" -gt $(( C1_SECONDS + 30 )) ]; then
        level "$cfg" 1 "$C1_SECONDS" 1   # one stream's chunk latency (issue 17: p50 at most 10 ms)
    fi
    for c in $LEVELS; do
        [ "$(left)" -gt $(( STREAM_S + 30 )) ] || { note "$cfg c=$c: not run (time)"; continue; }
        level "$cfg" "$c" "$STREAM_S" "$WORKERS"
    done
    kill -TERM "$SPID"; wait "$SPID" 2>/dev/null
done
note "done"
cp "$LOG" "$FINAL/pair.log"
tar czf "$FINAL/pair.tgz" -C "$OUT" . && rm -rf "$OUT"
