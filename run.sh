#!/usr/bin/env bash
# The two entry points a newcomer needs, on a fresh machine:
#   ./run.sh serve [asr-server flags]   start the service (builtin model; CPU, or the GPU when present)
#   ./run.sh test  [pytest args]        run the test suite
# Both create ./.venv and install the package with its dependencies on first use.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${VENV:-.venv}"
PY="${PYTHON:-python3}"

ensure_env() {
    local stamp="$VENV/.installed-$(sha256sum pyproject.toml | cut -c1-16)"
    if [ -f "$stamp" ]; then return; fi
    echo "run.sh: installing into $VENV (first run takes a few minutes)" >&2
    [ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # Pin torch before anything else asks for it: an unpinned request resolves to the newest
    # release, a multi-GB download where a matching build is already at hand.
    "$VENV/bin/python" -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
    "$VENV/bin/python" -m pip install -q -e ".[dev]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
}

cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
    serve)
        ensure_env
        exec "$VENV/bin/asr-server" "$@"
        ;;
    test)
        ensure_env
        set +e
        "$VENV/bin/python" -m pytest "$@"
        rc=$?
        set -e
        # pytest's 5 means no test ran: a broken collection must not pass as green.
        if [ "$rc" -eq 5 ]; then echo "run.sh: no tests were collected" >&2; exit 1; fi
        exit "$rc"
        ;;
    *)
        echo "usage: ./run.sh serve [asr-server flags] | ./run.sh test [pytest args]" >&2
        exit 2
        ;;
esac
