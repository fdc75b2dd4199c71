#!/usr/bin/env bash
# Time to final on the GPU host, in one short call (issue 14's "measure and record"): for each
# lookahead, one asr-server on the GPU and asr-loadgen calls of several utterances (the example
# clips joined by pauses), at one stream and at a load level, twice:
#   endpoint   - endpointing at stop_history $STOP_MS (Pipecat's default): end of speech -> final
#   client_eou - endpointing off, the client's end_utterance $EOU_MS after the speech: request -> final
# Results: $OUT/ttf_<model>_<lookahead>_<mode>.json, $OUT/ttf.log. Run from the repository root after
# installing the carried wheels (see bench/README.md). Knobs: MODEL, LOOKAHEADS, LEVELS (or LEVELS_<la>
# per lookahead), UTTS, PAUSE, SERVER_ARGS (e.g. "--frontends 4 --gil-switch-ms 0.5", the capacity
# set-up of bench/RESULTS.md), C1_UTTS (when set, one stream runs first on its own with that many
# utterances, for more samples at c=1; then LEVELS with UTTS; results ..._c1.json beside the rest).
set -u
OUT=${OUT:-/tmp/ttf_out}; mkdir -p "$OUT"
PY=${PY:-python3}
MODEL=${MODEL:-builtin:demo}; LOOKAHEADS=${LOOKAHEADS:-"160 560"}; LEVELS=${LEVELS:-1,256}
UTTS=${UTTS:-4}; PAUSE=${PAUSE:-1.0}; STOP_MS=${STOP_MS:-320}; EOU_MS=${EOU_MS:-200}
DTYPE=${DTYPE:-float16}; ENGINE=${ENGINE:-fast-cudagraph}; DEVICE=${DEVICE:-cuda}; WORKERS=${WORKERS:-4}; MAX_BATCH=${MAX_BATCH:-256}; MAX_STREAMS=${MAX_STREAMS:-4608}
LOG=$OUT/ttf.log
tag=$(basename "$MODEL" | tr ':' '_')
. "$(dirname "$0")/server_start.sh"
{ "$PY" -m client.provenance; nvidia-smi --query-gpu=name,driver_version --format=csv,noheader 2>/dev/null; } >> "$LOG" 2>&1
for la in $LOOKAHEADS; do
    if ! start_server "$OUT/server_$la.log" --model "$MODEL" --engine "$ENGINE" --device "$DEVICE" --dtype "$DTYPE" \
            --lookahead-ms "$la" --max-streams "$MAX_STREAMS" --max-batch "$MAX_BATCH" --log-level WARNING ${SERVER_ARGS:-} \
            2>> "$LOG"; then
        echo "server $la did not start" >> "$LOG"; continue
    fi
    spid=$SPID port=$PORT mport=$MPORT
    echo "$la ms: $LISTEN_LINE" >> "$LOG"
    lv_var=LEVELS_$la; levels=${!lv_var:-$LEVELS}
    for mode in endpoint client_eou; do
        extra=(--stop-history-ms "$STOP_MS")
        [ "$mode" = client_eou ] && extra=(--no-endpointing --client-eou-ms "$EOU_MS")
        runs=("$levels:$UTTS:")
        [ -n "${C1_UTTS:-}" ] && runs=("1:$C1_UTTS:_c1" "$levels:$UTTS:")
        for r in "${runs[@]}"; do
            IFS=: read -r lv n suffix <<< "$r"
            "$PY" -m client.loadgen --server "127.0.0.1:$port" --metrics-url "http://127.0.0.1:$mport/metrics" \
                --concurrency "$lv" --utterances "$n" --pause-s "$PAUSE" --audio examples "${extra[@]}" \
                --workers "$WORKERS" --ramp-s 2 --cooldown-s 1 --level-grace-s 30 --server-pid $spid \
                --json "$OUT/ttf_${tag}_${la}_${mode}${suffix}.json" --label "$tag $la ms $mode" >> "$LOG" 2>&1
        done
    done
    kill -TERM $spid; wait $spid
done
