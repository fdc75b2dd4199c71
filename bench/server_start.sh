# Sourced by the device scripts (bench/ttf_gpu.sh, bench/cores_gpu.sh): start one asr-server on
# loopback ports chosen by the kernel and wait for it.
#   start_server LOG [asr-server flags...]
# sets SPID, PORT, MPORT (metrics port) and LISTEN_LINE, and returns 0 once the server listens;
# non-zero (with the log's tail on stderr) when it exited or did not listen within
# ${START_TIMEOUT:-300} s. Needs PY.
start_server() {
    local log=$1; shift
    "$PY" -m server.service.cli "$@" --host 127.0.0.1 --port 0 --metrics-host 127.0.0.1 --metrics-port 0 > "$log" 2>&1 &
    SPID=$!
    local _
    for _ in $(seq 1 "${START_TIMEOUT:-300}"); do
        grep -q "listening on" "$log" && break
        kill -0 "$SPID" 2>/dev/null || break
        sleep 1
    done
    LISTEN_LINE=$(grep "listening on" "$log") || { tail -30 "$log" >&2; return 1; }
    PORT=$(sed -n 's/.*listening on 127\.0\.0\.1:\([0-9]*\).*/\1/p' <<< "$LISTEN_LINE")
    MPORT=$(sed -n 's/.*metrics on http:\/\/[^ ]*:\([0-9][0-9]*\)\/metrics.*/\1/p' <<< "$LISTEN_LINE")
}
