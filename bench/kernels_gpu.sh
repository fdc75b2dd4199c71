#!/usr/bin/env bash
# The step's Triton kernels on the GPU host, in one call of about 5 minutes (issue 17), each
# part skipped when the call's time (BUDGET_S, from the script's start) would run out before it:
#   1. bench/attention_bench.py: every launch of the attention kernel against PyTorch's gather +
#      bias + SDPA at the 0.6B model's shape; the best launch by new frames -> $OUT/tuning.txt,
#      exported as NEMOSTREAM_ATTENTION_TUNING for everything after it (step_attention.TUNING
#      should then hold it: commit the figures with it);
#   2. the GPU tests of the two kernel sets against PyTorch's (token agreement, no graph captured
#      while serving, the engine without a workspace for the cache) and of the block copies of
#      the slot pool's gather and commit against index_select / index_copy_ (timed beside them),
#      and of `--max-streams auto`'s measured headroom (a served step fits in what the probe held);
#   3. bench/step_bench.py: the step with torch against triton (A/B, alternating), then a
#      kernel-level profile of the triton step at PROFILE_ROWS rows;
#   4. one stream's chunk latency on a server with --step-kernels triton and one with torch (c=1,
#      issue 17's 10 ms target), each with no sizing flag.
# The capacity under load is bench/run_h100.sh's, in a call of its own (the kernels are the
# default since run 43; a launch measured here and not yet committed goes in the environment):
#   NEMOSTREAM_ATTENTION_TUNING=$(cat OUT/tuning.txt) LOOKAHEADS=160 CHURN=0 LONG_LEVELS_160=4096 \
#       MAX_C_160=6000 LONG_GROWTH=1.1 MAX_BATCH=auto MAX_STREAMS=auto bash bench/run_h100.sh
# Run from the repository root after installing the carried wheels (bench/README.md). Knobs:
# OUT, PY, BUDGET_S, LOOKAHEADS (step A/B), BATCHES, PROFILE_ROWS, PROFILE_LOOKAHEADS, C1_SECONDS,
# PROFILE_ENCODER_GRAPHS, C1_KERNELS, ATTENTION (0: skip part 1, the committed launch runs).
# $OUT ends with three files (the device tool brings back at most eight): kernels.log (the
# summary), tuning.txt (the measured launch) and kernels.tgz (every other file).
set -u
cd "$(dirname "$0")/.."
FINAL=${OUT:-/tmp/kernels_out}; mkdir -p "$FINAL"
OUT=$(mktemp -d /tmp/kernels.XXXXXX)
PY=${PY:-python3}
BUDGET_S=${BUDGET_S:-560}
LOOKAHEADS=${LOOKAHEADS:-160}; BATCHES=${BATCHES:-1,256,512,1024}; PROFILE_ROWS=${PROFILE_ROWS:-512}
PROFILE_LOOKAHEADS=${PROFILE_LOOKAHEADS:-160}; C1_KERNELS=${C1_KERNELS:-triton torch}
# off: the profiled encoder runs without CUDA graphs, so each kernel is counted under its operator
PROFILE_ENCODER_GRAPHS=${PROFILE_ENCODER_GRAPHS:-on}
C1_SECONDS=${C1_SECONDS:-20}
LOG=$OUT/kernels.log
left() { echo $(( BUDGET_S - SECONDS )); }
note() { echo "[kernels +${SECONDS}s] $*" | tee -a "$LOG"; }
{ "$PY" -m client.provenance; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; } >> "$LOG" 2>&1

if [ "${ATTENTION:-1}" = 1 ]; then
note "1. attention launches"
# Around run 42's best (32 keys a block, 4 warps): smaller blocks were faster there (32 beat 64 and
# the whole cache), so 16 and 2 warps are tried too, each in both launch orders (a row's heads
# together or apart); CUDA-core products lost at every size and stages 1 and 2 timed the same.
timeout 150 "$PY" bench/attention_bench.py --d-model 1024 --heads 8 --cache 70 --frames 2,7 --batches 256,512,1024 \
    --block-n 16,32,64 --warps 2,4,8 --stages 2 --products dot --orders rows,heads \
    --out "$OUT/attention.json" --tuning-out "$OUT/tuning.txt" > "$OUT/attention.txt" 2>&1
tail -22 "$OUT/attention.txt" | tee -a "$LOG"
if [ -s "$OUT/tuning.txt" ]; then
    export NEMOSTREAM_ATTENTION_TUNING; NEMOSTREAM_ATTENTION_TUNING=$(cat "$OUT/tuning.txt")
    note "launch: $NEMOSTREAM_ATTENTION_TUNING"
fi
fi

if [ "$(left)" -gt 150 ]; then
    note "2. the GPU test of the kernels"
    GPU_SUITE_FIGURES=$OUT/gpu_figures timeout 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider \
        tests/gpu/test_gpu_fast_cudagraph.py tests/gpu/test_gpu_serving.py -k 'triton_kernels or block_copy or auto_slots' > "$OUT/gpu_test.txt" 2>&1
    tail -3 "$OUT/gpu_test.txt" | tee -a "$LOG"
fi

if [ "$(left)" -gt 120 ]; then
    note "3. the step, torch against triton"
    timeout $(( $(left) - 60 )) "$PY" bench/step_bench.py --model builtin:nemotron-0.6b --device cuda --dtype float16 \
        --engine fast-cudagraph --lookaheads "$LOOKAHEADS" --batches "$BATCHES" --kernels torch,triton --repeats 2 \
        --no-nemo --out "$OUT/step_kernels.json" > "$OUT/step_kernels.txt" 2>&1
    grep '^|' "$OUT/step_kernels.txt" | tee -a "$LOG"
fi
if [ "$(left)" -gt 110 ]; then
    timeout 100 "$PY" bench/step_bench.py --model builtin:nemotron-0.6b --device cuda --dtype float16 \
        --engine fast-cudagraph --lookaheads "$PROFILE_LOOKAHEADS" --batches "$PROFILE_ROWS" --kernels triton --iters 4 --warm 2 --no-nemo \
        --encoder-graphs "$PROFILE_ENCODER_GRAPHS" --profile 4 > "$OUT/profile.txt" 2>&1
fi

. bench/server_start.sh
for kernels in $C1_KERNELS; do
    [ "$(left)" -gt $(( C1_SECONDS + 60 )) ] || { note "4. c=1 $kernels: not run (time)"; continue; }
    note "4. one stream, --step-kernels $kernels"
    start_server "$OUT/server_c1_$kernels.log" --model builtin:nemotron-0.6b --dtype float16 --device cuda \
        --step-kernels "$kernels" 2>> "$LOG" || continue
    timeout $(( C1_SECONDS + 30 )) "$PY" -m client.loadgen --server "127.0.0.1:$PORT" \
        --metrics-url "http://127.0.0.1:$MPORT/metrics" --server-pid "$SPID" --concurrency 1 --synthetic-clips 4 \
        --synthetic-seconds 8 --stream-seconds "$C1_SECONDS" --ramp-s 0 --workers 1 --cooldown-s 1 \
        --json "$OUT/c1_$kernels.json" > "$OUT/c1_$kernels.txt" 2>&1
    kill -TERM "$SPID"; wait "$SPID" 2>/dev/null
    grep -h "step kernels\|sizing:" "$OUT/server_c1_$kernels.log" | tee -a "$LOG"
    tail -4 "$OUT/c1_$kernels.txt" | tee -a "$LOG"
done
note "done"
cp "$LOG" "$FINAL/kernels.log"; [ -s "$OUT/tuning.txt" ] && cp "$OUT/tuning.txt" "$FINAL/"
tar czf "$FINAL/kernels.tgz" -C "$OUT" . && rm -rf "$OUT"
