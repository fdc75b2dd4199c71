#!/usr/bin/env bash
# End-to-end benchmark on one GPU host, in one command (about 9 minutes):
#   1. NeMo 3.0's own CacheAwareRNNTPipeline on the Nemotron-0.6b shape (the baseline to beat),
#      at 160 ms and 560 ms lookahead, in the server's dtype (.devbench/nemo_pipeline_baseline.py,
#      a git-ignored copy of ../shared/bench);
#   2. for each lookahead (160, 560 ms): asr-server --model builtin:nemotron-0.6b --dtype float16
#      --device cuda on the fastest engine that starts (fast-cudagraph, else eager: ListModels reports
#      what really ran), then asr-loadgen on the same machine (several worker processes), real-time
#      streams, capacity = the most streams with p95 chunk latency <= the lookahead, zero errors:
#      a. the churn variant (CHURN=1): one SECS-second clip per stream (stream openings, first
#         chunks and finals weigh as much as steady serving), a sweep and a capacity search; cheap
#         (a level lasts ~SECS + RAMP s), it also gives c=1 latency and where to look next;
#      b. the main measurement: streams of STREAM_S seconds (60: calls last minutes; clips played
#         back to back), levels from the churn capacity stepping by LONG_GROWTH (each level costs
#         STREAM_S + RAMP s, so two or three fit); STREAM_S=0 makes the short clips the main run;
#      then, on the same server (TTF=1), time to final: calls of several utterances (the example
#      clips joined by pauses) at one stream and at the capacity just found, twice: with
#      endpointing at stop_history 320 ms (Pipecat's default; end of speech -> final), and with
#      the client's end of utterance 200 ms after the speech (endpointing off; request -> final);
#      TTF_DEMO=1 repeats both on builtin:demo at 160 ms (a trained model: the random-weight
#      Nemotron shape may never hear a speaker stop, which the report then shows as utterances
#      closed by end_of_audio);
#   3. bench/summarize.py: summary.json + summary.md (tables, ratios to NeMo, the issue's targets;
#      the time-to-final runs' levels go into summary.json and a table of summary.md).
# Results in $OUT (at most 8 files): loadgen_160.{json,png}, loadgen_560.{json,png} (the main
# measurement), summary.json (the churn variant's levels too), summary.md, bench.log (console,
# baseline output, server logs), gpu.csv (nvidia-smi each second).
#
# Time (GPU defaults, one device call of 600 s; typical times from H200 runs 20-22): setup 10 s,
# baseline ~65 s, each server start ~35 s (START_EST 40), a churn level ~9.5 s, a 60 s level ~64 s.
# When a server is up, its lookahead's share is (BUDGET_S - elapsed - RESERVE - TTF_DEMO_EST
# - START_EST x servers still to start) / lookaheads left - TTF_EST: at 160 ms (up at ~110 s)
# (550 - 110 - 10 - 40) / 2 = 195 s: churn CHURN_S = 45 s (5 levels), then 195 - 48 - 5 = 142 s
# for 60 s levels: a level starts only if its ramp and audio end inside that (asr-loadgen
# --time-budget-s), so 2 (the second ends at ~127 s). At 560 ms (up at ~325 s): 550 - 325 - 10
# = 215 s: churn 45 s, 2 long levels. The run ends at ~505 s; the worst overrun past BUDGET_S is a
# level's grace (GRACE) and a server's stop, inside the 600 s.
#
#   bash bench/run_h100.sh                 # on the GPU host (through the device tool)
#   CPU_SMOKE=1 bash bench/run_h100.sh     # the same pipeline on CPU with builtin:tiny, ~2 minutes
#
# Every knob is an environment variable (defaults below); bench/README.md explains them.
# SERVER_ARGS adds asr-server flags, e.g. to sweep the batching deadline (issue 4):
#   SERVER_ARGS="--batch-wait-ms 10" bash bench/run_h100.sh     # default 5 ms from the oldest ready chunk
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
T0=$(date +%s)
SMOKE=${CPU_SMOKE:-0}
OUT=${OUT:-$ROOT/.devbench/out}
mkdir -p "$OUT"
WORK=$(mktemp -d /tmp/nemo-stream-bench.XXXXXX)
LOG=$OUT/bench.log
: > "$LOG"

if [ "$SMOKE" = 1 ]; then
    BUDGET_S=${BUDGET_S:-180}
    MODEL=${MODEL:-builtin:tiny}; DEVICE=${DEVICE:-cpu}; DTYPE=${DTYPE:-float32}
    ENGINE=${ENGINE:-eager}; FALLBACK=${FALLBACK:-}
    LOOKAHEADS=${LOOKAHEADS:-160 560}
    LEVELS_160=${LEVELS_160:-1,2,4}; LEVELS_560=${LEVELS_560:-1,4}
    MAX_C_160=${MAX_C_160:-4}; MAX_C_560=${MAX_C_560:-4}
    MAX_BATCH=${MAX_BATCH:-8}; MAX_STREAMS=${MAX_STREAMS:-16}
    WORKERS=${WORKERS:-2}; SECS=${SECS:-1.5}; CLIPS=${CLIPS:-2}; RAMP=${RAMP:-0.3}; GRACE=${GRACE:-3}
    PROBES=${PROBES:-2}; START_EST=${START_EST:-25}; RESERVE=${RESERVE:-5}; MIN_BUDGET=${MIN_BUDGET:-10}
    STREAM_S=${STREAM_S:-4}; CHURN=${CHURN:-1}; CHURN_S=${CHURN_S:-12}; LONG_GROWTH=${LONG_GROWTH:-1.1}; LONG_PROBES=${LONG_PROBES:-2}
    # Every server starts at once: start-up is most of the smoke's time, and its timings mean nothing.
    PARALLEL_START=${PARALLEL_START:-1}
    # The baseline at toy size on CPU proves the invocation (its figures mean nothing); it costs
    # about 80 s of a 2-core machine, so it runs only with SMOKE_BASELINE=1 (in the background).
    SMOKE_BASELINE=${SMOKE_BASELINE:-0}
    BASE_DTYPE=${BASE_DTYPE:-$DTYPE}
    BASE_ARGS=${BASE_ARGS:-"2 64 cpu $BASE_DTYPE 4 2 70,1;70,6 4"}
    BASE_TIMEOUT=${BASE_TIMEOUT:-300}
    TTF_UTTERANCES=${TTF_UTTERANCES:-2}; TTF_EST=${TTF_EST:-25}; TTF_DEMO=${TTF_DEMO:-0}; TTF_DEMO_EST=${TTF_DEMO_EST:-60}
else
    BUDGET_S=${BUDGET_S:-550}
    MODEL=${MODEL:-builtin:nemotron-0.6b}; DEVICE=${DEVICE:-cuda}; DTYPE=${DTYPE:-float16}
    ENGINE=${ENGINE:-fast-cudagraph}; FALLBACK=${FALLBACK-eager}
    LOOKAHEADS=${LOOKAHEADS:-160 560}
    # The short-clip sweep (the churn variant; the main run with STREAM_S=0) around the capacities
    # of runs 20-22 (2,016-2,232 at 160 ms, 4,352 at 560 ms, 6 s clips).
    LEVELS_160=${LEVELS_160:-1,2048,2560}; LEVELS_560=${LEVELS_560:-1,4096,4608}
    MAX_C_160=${MAX_C_160:-4096}; MAX_C_560=${MAX_C_560:-4608}
    MAX_BATCH=${MAX_BATCH:-256}; MAX_STREAMS=${MAX_STREAMS:-4608}
    WORKERS=${WORKERS:-8}; SECS=${SECS:-6}; CLIPS=${CLIPS:-16}; RAMP=${RAMP:-2}; GRACE=${GRACE:-20}
    PROBES=${PROBES:-4}; START_EST=${START_EST:-40}; RESERVE=${RESERVE:-10}; MIN_BUDGET=${MIN_BUDGET:-20}
    STREAM_S=${STREAM_S:-60}; CHURN=${CHURN:-1}; CHURN_S=${CHURN_S:-45}; LONG_GROWTH=${LONG_GROWTH:-1.1}; LONG_PROBES=${LONG_PROBES:-3}
    # One server at a time: nothing else runs beside a measurement.
    PARALLEL_START=${PARALLEL_START:-0}
    SMOKE_BASELINE=0
    # The baseline runs in the server's dtype, so the ratio compares like with like. The script
    # passes its DTYPE to NeMo's pipeline config (asr.compute_dtype); NeMo's setup_device
    # (nemo.collections.asr.inference.utils.device_utils) takes bfloat16, float16 or float32 on
    # CUDA, and with use_amp false (nemo_pipeline.yaml) the wrapper casts the model to it. On CPU
    # NeMo always computes in float32, whatever is asked. BASE_DTYPE=bfloat16 gives runs 1-22's.
    BASE_DTYPE=${BASE_DTYPE:-$DTYPE}
    # LAYERS DMODEL DEVICE DTYPE FILES SECONDS CTXS BATCHES (see .devbench/nemo_pipeline_baseline.py)
    BASE_ARGS=${BASE_ARGS:-"24 1024 cuda $BASE_DTYPE 256 10 70,1;70,6 256"}
    BASE_TIMEOUT=${BASE_TIMEOUT:-170}
    # Time to final does not fit beside 60 s levels in one 600 s call: bench/ttf_gpu.sh measures it in
    # its own call (TTF=1 here adds it back, at the cost of long levels).
    if [ "$STREAM_S" != 0 ]; then TTF=${TTF:-0}; TTF_DEMO=${TTF_DEMO:-0}; fi
    TTF_UTTERANCES=${TTF_UTTERANCES:-4}; TTF_EST=${TTF_EST:-75}; TTF_DEMO=${TTF_DEMO:-1}; TTF_DEMO_EST=${TTF_DEMO_EST:-150}
fi
# Time to final (TTF=0: off): calls of TTF_UTTERANCES clips of TTF_AUDIO joined by TTF_PAUSE s of
# silence; endpointing stop_history TTF_STOP_MS; client end of utterance TTF_EOU_MS after speech.
# TTF_EST / TTF_DEMO_EST: seconds of the budget kept for them per lookahead / for the demo run.
TTF=${TTF:-1}; TTF_AUDIO=${TTF_AUDIO:-examples}; TTF_PAUSE=${TTF_PAUSE:-1.0}
TTF_STOP_MS=${TTF_STOP_MS:-320}; TTF_EOU_MS=${TTF_EOU_MS:-200}
[ "$TTF" = 1 ] || { TTF_EST=0; TTF_DEMO=0; }
[ "$TTF_DEMO" = 1 ] || TTF_DEMO_EST=0
CAP_METRIC=${CAP_METRIC:-chunk}
# Audio per client message in the capacity runs, ms; 0: the model's chunk. Voice agents send 20 ms
# packets (frontends hold them until a chunk is complete: docs/SCALING.md, the wire).
CHUNK_MS=${CHUNK_MS:-0}
RESOLUTION=${RESOLUTION:-0.05}
START_TIMEOUT=${START_TIMEOUT:-300}
SERVER_PIDS=""; MON_PID=""; BASE_PID=""

elapsed() { echo $(( $(date +%s) - T0 )); }
remaining() { echo $(( BUDGET_S - $(elapsed) )); }
log() { echo "[bench $(date +%T) +$(elapsed)s] $*" | tee -a "$LOG"; }
cleanup() {
    for pid in $SERVER_PIDS $MON_PID $BASE_PID; do kill "$pid" 2>/dev/null; done
    rm -rf "$WORK"
}
trap cleanup EXIT

# -- Python, packages, the machine ---------------------------------------------------------------------
if [ "$SMOKE" = 1 ] && [ -z "${PYTHON:-}" ] && [ -x "$ROOT/.venv/bin/python" ]; then PY=$ROOT/.venv/bin/python; else PY=${PYTHON:-python3}; fi
# proto's generated code refuses a grpcio older than it was generated for: importing it checks that.
if [ "$SMOKE" != 1 ] && ! (cd "$ROOT" && "$PY" -c "import nemo, grpc_health, grpc_reflection, msgspec, soxr, proto.asr_stream_pb2_grpc") 2>/dev/null; then
    if ls "$ROOT"/.whl/*.whl >/dev/null 2>&1; then
        log "installing wheels from .whl into $WORK/site"
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$WORK/site" "$ROOT"/.whl/*.whl \
            >>"$LOG" 2>&1 || { log "FATAL: pip install of .whl failed"; exit 1; }
        export PYTHONPATH="$WORK/site${PYTHONPATH:+:$PYTHONPATH}"
    fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
# A number stays a number in the settings' JSON; `auto` (the server's own sizing) becomes a string.
json_num_or_str() { if [[ $1 =~ ^[0-9]+$ ]]; then echo "$1"; else echo "\"$1\""; fi; }
BASE_DTYPE=$(awk '{print $4}' <<< "$BASE_ARGS")  # what really runs, also when BASE_ARGS is given
SETTINGS=$(printf '{"model":"%s","device":"%s","dtype":"%s","engine":"%s","fallback":"%s","lookaheads":"%s","levels_160":"%s","levels_560":"%s","max_batch":%s,"max_streams":%s,"workers":%s,"clip_s":%s,"stream_s":%s,"churn":%s,"churn_s":%s,"long_growth":%s,"long_probes":%s,"ramp_s":%s,"capacity_metric":"%s","baseline_args":"%s","baseline_dtype":"%s","server_args":"%s","budget_s":%s,"cpu_smoke":%s}' \
    "$MODEL" "$DEVICE" "$DTYPE" "$ENGINE" "$FALLBACK" "$LOOKAHEADS" "$LEVELS_160" "$LEVELS_560" "$(json_num_or_str "$MAX_BATCH")" "$(json_num_or_str "$MAX_STREAMS")" \
    "$WORKERS" "$SECS" "$STREAM_S" "$CHURN" "$CHURN_S" "$LONG_GROWTH" "$LONG_PROBES" "$RAMP" "$CAP_METRIC" "$BASE_ARGS" "$BASE_DTYPE" "${SERVER_ARGS:-}" "$BUDGET_S" "$SMOKE")
GPU="cpu only"
if command -v nvidia-smi >/dev/null 2>&1; then
    GPU=$(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -1)
    nvidia-smi --query-gpu=timestamp,utilization.gpu,memory.used,power.draw --format=csv -l 1 > "$OUT/gpu.csv" 2>/dev/null &
    MON_PID=$!
fi
# One interpreter start checks every package the run needs and records the machine and the exact
# source that runs (client/provenance.py: git's commit and dirty flag, or, in a copy without .git,
# the REVISION.json stamp `python -m client.provenance --stamp` wrote before the copy, checked
# against the hash of the files that actually ran).
cat > "$WORK/env.py" <<'PYEOF'
import json, os, platform, sys
import grpc, grpc_health.v1.health, grpc_reflection.v1alpha.reflection, msgspec, prometheus_client, soxr, torch
import nemo
from client.provenance import describe, source_revision
path, gpu, settings = sys.argv[1:4]
settings = json.loads(settings)
revision = source_revision()
env = {"gpu": gpu, "cpus": os.cpu_count(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "cuda_available": torch.cuda.is_available(), "nemo": nemo.__version__, "grpcio": grpc.__version__,
       "python": platform.python_version(), "platform": platform.platform(),
       "commit": revision["commit"], "dirty": revision["dirty"], "source_revision": revision,
       "commit_line": describe(revision),
       "command": ("CPU_SMOKE=1 " if settings["cpu_smoke"] == 1 else "") + "bash bench/run_h100.sh",
       "settings": settings}
json.dump(env, open(path, "w"), indent=1)
print(json.dumps(env))
PYEOF
if ! "$PY" "$WORK/env.py" "$WORK/env.json" "$GPU" "$SETTINGS" >>"$LOG" 2>&1; then
    log "FATAL: a package is missing (see bench.log). On a GPU host without network, carry .whl"
    log "       made by: python scripts/gpu_wheels.py --download .whl"
    exit 1
fi
log "machine: $GPU, $(nproc) cores; settings $SETTINGS"

# -- 1. NeMo's CacheAwareRNNTPipeline baseline -----------------------------------------------------------
BASE_DIR=$ROOT/.devbench
if [ ! -f "$BASE_DIR/nemo_pipeline_baseline.py" ] && [ -d "$ROOT/../shared/bench" ]; then
    mkdir -p "$BASE_DIR" && cp "$ROOT"/../shared/bench/*.py "$ROOT"/../shared/bench/*.yaml "$BASE_DIR"/
fi
BASE_SKIPPED=""
run_baseline() {
    if [ ! -f "$BASE_DIR/tok/tokenizer.model" ]; then
        "$PY" "$BASE_DIR/make_tokenizer.py" >>"$LOG" 2>&1 || { echo "make_tokenizer.py failed" > "$WORK/baseline.skipped"; return; }
    fi
    local bargs
    IFS=' ' read -r -a bargs <<< "$BASE_ARGS"
    timeout "$BASE_TIMEOUT" "$PY" "$BASE_DIR/nemo_pipeline_baseline.py" "${bargs[@]}" > "$WORK/baseline.out" 2>&1
    local rc=$?
    grep '^{' "$WORK/baseline.out" > "$WORK/baseline.jsonl"
    { echo "---- NeMo baseline output (rc $rc) ----"; grep -v '^\[NeMo [IW]\|^    ' "$WORK/baseline.out" | tail -n 60; } >> "$LOG"
    [ "$rc" = 0 ] || echo "nemo_pipeline_baseline.py exited with $rc (124: timeout after ${BASE_TIMEOUT}s)" > "$WORK/baseline.skipped"
}
if [ ! -f "$BASE_DIR/nemo_pipeline_baseline.py" ]; then
    BASE_SKIPPED="no .devbench/nemo_pipeline_baseline.py: copy ../shared/bench into .devbench and carry it"
    log "baseline skipped: $BASE_SKIPPED"
elif [ "$SMOKE" = 1 ] && [ "$SMOKE_BASELINE" != 1 ]; then
    BASE_SKIPPED="CPU smoke: the baseline's model is the full 0.6B one on a GPU; SMOKE_BASELINE=1 runs it at toy size on CPU"
    log "baseline skipped: $BASE_SKIPPED"
elif [ "$SMOKE" = 1 ]; then
    log "baseline (toy size, in the background): nemo_pipeline_baseline.py $BASE_ARGS"
    run_baseline &
    BASE_PID=$!
else
    log "baseline: nemo_pipeline_baseline.py $BASE_ARGS (timeout ${BASE_TIMEOUT}s)"
    run_baseline
    log "baseline done: $(wc -l < "$WORK/baseline.jsonl" 2>/dev/null || echo 0) JSON lines"
fi

# -- 2. our service, per lookahead ------------------------------------------------------------------
declare -A SPID PORTS MPORTS STARTED
launch_server() {  # $1: lookahead ms; $2: the server's name (default: the lookahead); $3: model (default $MODEL)
    local la=$1 key=${2:-$1} model=${3:-$MODEL} fb=()
    [ -n "$FALLBACK" ] && fb=(--fallback-engine "$FALLBACK")
    log "== lookahead $la ms: starting asr-server ($model, engine $ENGINE${FALLBACK:+, fallback $FALLBACK}, $DEVICE, $DTYPE)"
    "$PY" -m server.service.cli --model "$model" --engine "$ENGINE" "${fb[@]}" --device "$DEVICE" --dtype "$DTYPE" \
        --lookahead-ms "$la" --max-batch "$MAX_BATCH" --max-streams "$MAX_STREAMS" --host 127.0.0.1 --port 0 \
        --metrics-host 127.0.0.1 --metrics-port 0 --log-level WARNING --idle-timeout-s 60 ${SERVER_ARGS:-} \
        > "$WORK/server_$key.log" 2>&1 &
    SPID[$key]=$!
    SERVER_PIDS="$SERVER_PIDS ${SPID[$key]}"
    STARTED[$key]=$(date +%s)
}
await_server() {  # $1: the server's name. Sets PORTS/MPORTS; non-zero when the server did not come up.
    local la=$1 slog=$WORK/server_$1.log
    while ! grep -q "asr-server: listening on" "$slog"; do
        if ! kill -0 "${SPID[$la]}" 2>/dev/null; then log "server ($la ms) exited during start-up"; return 1; fi
        if [ $(( $(date +%s) - STARTED[$la] )) -ge "$START_TIMEOUT" ]; then log "server ($la ms) not up after ${START_TIMEOUT}s"; return 1; fi
        sleep 1
    done
    local line
    line=$(grep -m1 "asr-server: listening on" "$slog")
    PORTS[$la]=$(sed -n 's/.*listening on [^ ]*:\([0-9][0-9]*\) .*/\1/p' <<< "$line")
    MPORTS[$la]=$(sed -n 's/.*metrics on http:\/\/[^ ]*:\([0-9][0-9]*\)\/metrics.*/\1/p' <<< "$line")
    log "server ($la ms) up $(( $(date +%s) - STARTED[$la] ))s after launch: $line"
}
stop_server() {  # $1: the server's name
    local pid=${SPID[$1]:-}
    if [ -n "$pid" ]; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
        kill -KILL "$pid" 2>/dev/null
        wait "$pid" 2>/dev/null
    fi
    { echo "---- server log, lookahead $1 ms (last 150 lines) ----"; tail -n 150 "$WORK/server_$1.log" 2>/dev/null; } >> "$LOG"
}

ttf_levels() {  # $1: a capacity run's JSON. "1,<capacity>" (or "1" when it found none above 1)
    "$PY" - "$1" <<'PYEOF' 2>/dev/null || echo 1
import json, sys
cap = (json.load(open(sys.argv[1])).get("capacity") or {}).get("capacity") or 0
print(f"1,{cap}" if cap > 1 else "1")
PYEOF
}
time_to_final() {  # $1: the server's name (it is up), $2: levels
    local name=$1 levels=$2 mode
    for mode in endpoint client_eou; do
        local extra=(--stop-history-ms "$TTF_STOP_MS")
        [ "$mode" = client_eou ] && extra=(--no-endpointing --client-eou-ms "$TTF_EOU_MS")
        log "time to final ($name, $mode): levels $levels, calls of $TTF_UTTERANCES utterances of $TTF_AUDIO, pauses ${TTF_PAUSE}s"
        "$PY" -m client.loadgen --server "127.0.0.1:${PORTS[$name]}" --metrics-url "http://127.0.0.1:${MPORTS[$name]}/metrics" \
            --concurrency "$levels" --utterances "$TTF_UTTERANCES" --pause-s "$TTF_PAUSE" --audio $TTF_AUDIO "${extra[@]}" \
            --workers "$WORKERS" --ramp-s "$RAMP" --cooldown-s 1 --level-grace-s "$GRACE" --server-pid "${SPID[$name]}" \
            --json "$WORK/ttf_${name}_${mode}.json" --label "$GPU / $name / $mode" --quiet 2>&1 | tee -a "$LOG"
        log "time to final ($name, $mode) exit status ${PIPESTATUS[0]}"
    done
}

# One asr-loadgen measurement against the server of lookahead $1: $2 the JSON (and plot) path
# without extension, $3 sweep levels, $4 seconds of time budget, $5.. extra flags (audio, search).
measure() {
    local la=$1 path=$2 levels=$3 budget=$4 maxc_var=MAX_C_$1
    shift 4
    local maxc=${!maxc_var:-1024} plot=()
    [[ $path == "$OUT"/* ]] && plot=(--plot "$path.png")
    log "loadgen -> $(basename "$path").json: levels $levels, capacity search up to $maxc (p95 $CAP_METRIC latency <= $la ms), levels that end within ${budget}s; $*"
    "$PY" -m client.loadgen --server "127.0.0.1:${PORTS[$la]}" --metrics-url "http://127.0.0.1:${MPORTS[$la]}/metrics" \
        --concurrency "$levels" --capacity --capacity-metric "$CAP_METRIC" --target-ms "$la" --stop-on-fail \
        --max-concurrency "$maxc" --resolution "$RESOLUTION" --workers "$WORKERS" --synthetic-clips "$CLIPS" \
        --synthetic-seconds "$SECS" --ramp-s "$RAMP" --cooldown-s 1 --level-grace-s "$GRACE" --chunk-ms "$CHUNK_MS" \
        --time-budget-s "$budget" --server-pid "${SPID[$la]}" --json "$path.json" "${plot[@]}" \
        --label "$GPU / $la ms / $ENGINE" --quiet "$@" 2>&1 | tee -a "$LOG"
    log "loadgen $(basename "$path") exit status ${PIPESTATUS[0]}"
}
capacity_of() {  # $1: a capacity run's JSON: its capacity (0 when none)
    "$PY" - "$1" <<'PYEOF' 2>/dev/null || echo 0
import json, sys
print((json.load(open(sys.argv[1])).get("capacity") or {}).get("capacity") or 0)
PYEOF
}

set -- $LOOKAHEADS
n_left=$#
# A level of the long run: ramp, audio, cooldown and ~1 s for the finals and ListModels after it.
LONG_LEVEL_S=$(awk -v r="$RAMP" -v s="$STREAM_S" 'BEGIN { printf "%d", r + s + 2.99 }')
SHORT_LEVEL_S=$(awk -v r="$RAMP" -v s="$SECS" 'BEGIN { printf "%d", r + s + 2.99 }')
TAIL_S=5  # after a run's last level: its finals, the report, the plot
LONG=$([ "$STREAM_S" != 0 ] && echo 1 || echo 0)
declare -A UP
if [ "$PARALLEL_START" = 1 ]; then
    # Every server is up before the first measurement: one still starting beside it (importing
    # NeMo, building its model) would take the cores a measured server needs.
    for la in $LOOKAHEADS; do launch_server "$la"; done
    for la in $LOOKAHEADS; do await_server "$la" && UP[$la]=1; done
fi
for la in $LOOKAHEADS; do
    if [ "$PARALLEL_START" != 1 ]; then launch_server "$la"; await_server "$la" && UP[$la]=1; fi
    if [ -n "${UP[$la]:-}" ]; then
        # Split what is left between this lookahead and the next ones (each may need a server start).
        t_la=$(date +%s)
        starts=$(( PARALLEL_START == 1 ? 0 : n_left - 1 ))
        share=$(( ( $(remaining) - RESERVE - TTF_DEMO_EST - starts * START_EST ) / n_left - TTF_EST ))
        levels_var=LEVELS_$la; levels=${!levels_var:-1}
        if [ "$LONG" = 0 ]; then
            budget=$(( share - TAIL_S )); [ "$budget" -lt "$MIN_BUDGET" ] && budget=$MIN_BUDGET
            measure "$la" "$OUT/loadgen_$la" "$levels" "$budget" --max-probes "$PROBES"
        else
            long_levels_var=LONG_LEVELS_$la; long_levels=${!long_levels_var:-}
            if [ "$CHURN" = 1 ]; then
                # Churn first: cheap, and its capacity is where the long levels start. It leaves
                # two long levels their time when it can, and always runs its first level.
                budget=$(( share - 2 * LONG_LEVEL_S - TAIL_S ))
                [ "$budget" -gt "$CHURN_S" ] && budget=$CHURN_S
                [ "$budget" -lt "$SHORT_LEVEL_S" ] && budget=$SHORT_LEVEL_S
                log "== churn variant ($la ms): one ${SECS}s clip per stream"
                measure "$la" "$WORK/churn_$la" "$levels" "$budget" --max-probes "$PROBES"
                churn_cap=$(capacity_of "$WORK/churn_$la.json")
                [ -z "$long_levels" ] && [ "$churn_cap" -gt 1 ] 2>/dev/null && long_levels=$churn_cap
            fi
            [ -z "$long_levels" ] && long_levels=$levels
            budget=$(( share - ( $(date +%s) - t_la ) - TAIL_S ))
            if [ "$budget" -lt "$LONG_LEVEL_S" ]; then
                log "long streams ($la ms): ${budget}s left of this lookahead's share, less than one level (${LONG_LEVEL_S}s): not run"
            else
                log "== long streams ($la ms): ${STREAM_S}s of audio each (clips back to back), levels from $long_levels by x$LONG_GROWTH"
                measure "$la" "$OUT/loadgen_$la" "$long_levels" "$budget" --stream-seconds "$STREAM_S" \
                    --capacity-growth "$LONG_GROWTH" --max-probes "$LONG_PROBES"
            fi
        fi
        [ "$TTF" = 1 ] && time_to_final "$la" "$(ttf_levels "$OUT/loadgen_$la.json")"
    fi
    stop_server "$la"
    n_left=$((n_left - 1))
done

# Time to final on the trained demo model (its endpointer hears real pauses), at 160 ms, at one
# stream and at the Nemotron shape's capacity (the demo model is smaller: below its own).
if [ "$TTF_DEMO" = 1 ]; then
    launch_server 160 demo160 builtin:demo
    if await_server demo160; then
        time_to_final demo160 "$(ttf_levels "$OUT/loadgen_160.json")"
    fi
    stop_server demo160
fi

# -- 3. summary --------------------------------------------------------------------------------------
if [ -n "$BASE_PID" ]; then
    log "waiting for the background baseline"
    wait "$BASE_PID"
    BASE_PID=""
fi
[ -f "$WORK/baseline.skipped" ] && BASE_SKIPPED=$(cat "$WORK/baseline.skipped")
"$PY" bench/summarize.py --out "$OUT" --baseline "$WORK/baseline.jsonl" --baseline-dtype "$BASE_DTYPE" --ttf "$WORK" --churn "$WORK" \
    --env "$WORK/env.json" ${BASE_SKIPPED:+--baseline-skipped "$BASE_SKIPPED"} 2>&1 | tee -a "$LOG"
[ -n "$MON_PID" ] && kill "$MON_PID" 2>/dev/null
log "done in $(elapsed)s; results in $OUT: $(ls "$OUT" | tr '\n' ' ')"
