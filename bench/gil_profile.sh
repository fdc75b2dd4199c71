#!/usr/bin/env bash
# Where the server's interpreter lock goes under load (issue 4), on the GPU host: asr-server
# (builtin:nemotron-0.6b, fp16, fast-cudagraph, 160 ms) runs under `py-spy record --gil`
# (py-spy's wheel carried in .whl/), asr-loadgen holds C real-time streams for a while, then
# bench/gil_summary.py turns py-spy's stacks into a table per thread: the functions holding the
# lock, self and inclusive. Start-up samples are dropped (stacks through the engine factory).
#   C=384 bash bench/gil_profile.sh        # through the device tool, carry [".whl"]
#   SKIP_WHEELS=1 MODEL=builtin:tiny ENGINE=eager DEVICE=cpu DTYPE=float32 C=8 SECONDS_LOAD=5 bash bench/gil_profile.sh
# Output in $OUT: gil_stacks.txt (py-spy raw), gil_summary.md, loadgen.json, profile.log (with
# the server's log).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-.devbench/gil}; mkdir -p "$OUT"
C=${C:-384}; SECONDS_LOAD=${SECONDS_LOAD:-25}; LA=${LA:-160}
LOG=$OUT/profile.log; : > "$LOG"
MODEL=${MODEL:-builtin:nemotron-0.6b} ENGINE=${ENGINE:-fast-cudagraph} DEVICE=${DEVICE:-cuda} DTYPE=${DTYPE:-float16}
if [ -z "${SKIP_WHEELS:-}" ]; then  # SKIP_WHEELS=1: an environment that has it all (a CPU smoke)
  SITE=/tmp/gilsite
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=$SITE:$PWD PATH=$SITE/bin:$PATH
fi
py-spy record --gil --threads --rate 200 --format raw --nonblocking -o "$OUT/gil_stacks.txt" -- \
  python3 -m server.service.cli --model "$MODEL" --engine "$ENGINE" --device "$DEVICE" --dtype "$DTYPE" \
  --lookahead-ms "$LA" --max-batch 256 --max-streams 2048 --host 127.0.0.1 --port 50071 --metrics-port 0 \
  --log-level WARNING ${SERVER_ARGS:-} > /tmp/gil_server.log 2>&1 &
SPY=$!
for _ in $(seq 1 240); do grep -q "asr-server: listening on" /tmp/gil_server.log && break; sleep 1; done
grep "asr-server:" /tmp/gil_server.log | tee -a "$LOG"
python3 -m client.loadgen --server 127.0.0.1:50071 --concurrency "$C" --workers 8 --ramp-s 2 \
  --synthetic-clips 8 --synthetic-seconds "$SECONDS_LOAD" --json "$OUT/loadgen.json" >>"$LOG" 2>&1
echo "loadgen exit $?" | tee -a "$LOG"
pkill -INT -f "server.service.cli --model $MODEL" ; sleep 8
kill -INT "$SPY" 2>/dev/null; wait "$SPY"
python3 bench/gil_summary.py "$OUT/gil_stacks.txt" > "$OUT/gil_summary.md" 2>>"$LOG"
{ echo "---- server log (last 40 lines) ----"; tail -n 40 /tmp/gil_server.log; } >> "$LOG"
cat "$OUT/gil_summary.md"
tail -n 25 "$LOG"
