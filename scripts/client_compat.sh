#!/usr/bin/env bash
# Real benchmark clients, unchanged, against `fineserve serve` (the demo fleet): guidellm and aiperf
# (synthetic ~128-token prompts, 16 output tokens; streaming and not; concurrency 1, 4 and 16) and the
# official `openai` client's structured-output helpers (parse() with a pydantic response_format, a
# strict pydantic tool with tool_choice="required", the streaming helper). Prints a pass/fail table,
# writes a JSON summary and exits non-zero if anything failed. About 10 minutes on a 2-core CPU (once
# the client venv exists and the server's compile cache is warm).
#
#   bash scripts/client_compat.sh [--json PATH] [--model NAME] [--port P] [--work DIR] [--quick]
#
#   --json   the summary (default benchmarks/client_compat.json)
#   --model  the served model the benchmark clients use (default: the first of /v1/models)
#   --port   the server's port (default: a free one)
#   --work   where the tokenizer, client outputs and logs go (default: a fresh /tmp/client_compat.XXXX)
#   --quick  concurrency 1 and 4 only, 4/8 requests (a plumbing check)
#
# Needs .venv (scripts/setup.sh) and the SmolLM2 GGUF it fetches. The clients live in their own venv,
# .venv-clients (created here on first use: `pip install guidellm aiperf`), away from the project's pins.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

JSON_OUT=benchmarks/client_compat.json
MODEL=
PORT=
WORK=
QUICK=
while [ $# -gt 0 ]; do
  case $1 in
    --json) JSON_OUT=$2; shift 2 ;;
    --model) MODEL=$2; shift 2 ;;
    --port) PORT=$2; shift 2 ;;
    --work) WORK=$2; shift 2 ;;
    --quick) QUICK=1; shift ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "unknown argument: $1" >&2; exit 2 ;;
  esac
done

PY=$ROOT/.venv/bin/python
CVENV=$ROOT/.venv-clients
CPY=$CVENV/bin/python
HELPER=$ROOT/scripts/client_compat.py
[ -x "$PY" ] || { echo "no .venv: run bash scripts/setup.sh first" >&2; exit 2; }
WORK=${WORK:-$(mktemp -d /tmp/client_compat.XXXX)}
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
ROWS=$WORK/rows.jsonl
: > "$ROWS"
T0=$SECONDS
log() { echo "[$(date +%H:%M:%S) +$((SECONDS - T0))s] $*" >&2; }
log "work folder: $WORK"

if [ -n "$QUICK" ]; then
  LEVELS="1:4 4:8"
else
  LEVELS="1:8 4:16 16:32"  # concurrency:requests
fi

# ---- 1. the client venv ------------------------------------------------------------------------
if ! { [ -x "$CVENV/bin/guidellm" ] && [ -x "$CVENV/bin/aiperf" ]; }; then
  log "creating $CVENV (pip install guidellm aiperf; log: $WORK/pip.log)"
  { [ -x "$CPY" ] || "$PY" -m venv "$CVENV"; } &&
    "$CVENV/bin/pip" install guidellm aiperf > "$WORK/pip.log" 2>&1 ||
    { echo "pip install guidellm aiperf failed; see $WORK/pip.log" >&2; tail -20 "$WORK/pip.log" >&2; exit 2; }
fi
GUIDELLM_VERSION=$("$CPY" -c 'import importlib.metadata as m; print(m.version("guidellm"))')
AIPERF_VERSION=$("$CPY" -c 'import importlib.metadata as m; print(m.version("aiperf"))')
log "clients: guidellm $GUIDELLM_VERSION, aiperf $AIPERF_VERSION"

# ---- 2. the tokenizer as an HF folder -----------------------------------------------------------
TOK=$WORK/tokenizer
"$PY" "$HELPER" export-tokenizer "$TOK" || exit 2
"$CPY" "$HELPER" check-tokenizer "$TOK" 2> "$WORK/check_tokenizer.log" ||
  { cat "$WORK/check_tokenizer.log" >&2; echo "AutoTokenizer cannot load $TOK" >&2; exit 2; }

# ---- 3. the server ------------------------------------------------------------------------------
if [ -z "$PORT" ]; then
  PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
URL=http://127.0.0.1:$PORT
SERVER_LOG=$WORK/server.log
SERVER_PID=
stop_server() {
  [ -n "$SERVER_PID" ] || return 0
  if kill -0 "$SERVER_PID" 2>/dev/null; then
    log "stopping the server (pid $SERVER_PID)"
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 1 40); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$SERVER_PID" 2>/dev/null && kill -KILL "$SERVER_PID" 2>/dev/null
  fi
  wait "$SERVER_PID" 2>/dev/null
  SERVER_PID=
}
trap stop_server EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "starting .venv/bin/fineserve serve --port $PORT (log: $SERVER_LOG)"
"$ROOT/.venv/bin/fineserve" serve --port "$PORT" > "$SERVER_LOG" 2>&1 &
SERVER_PID=$!
DEADLINE=$((SECONDS + 900))
until [ "$(curl -s -o /dev/null -w '%{http_code}' "$URL/health")" = 200 ]; do
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "the server exited while starting; last lines of $SERVER_LOG:" >&2; tail -c 3000 "$SERVER_LOG" >&2; exit 2
  fi
  if [ $SECONDS -ge $DEADLINE ]; then echo "the server was not healthy after 900 s" >&2; exit 2; fi
  sleep 2
done
MODELS=$(curl -s "$URL/v1/models" | "$PY" -c 'import json, sys; print(" ".join(m["id"] for m in json.load(sys.stdin)["data"]))')
log "healthy; /v1/models: $MODELS"
MODEL=${MODEL:-${MODELS%% *}}
case " $MODELS " in *" $MODEL "*) ;; *) echo "$MODEL is not served ($MODELS)" >&2; exit 2 ;; esac

# ---- 4. guidellm ----------------------------------------------------------------------------------
# The clients are offline: no hub look-ups, the tokenizer comes from $TOK.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
for stream in true false; do
  mode=$([ $stream = true ] && echo stream || echo non-stream)
  for level in $LEVELS; do
    conc=${level%%:*}; n=${level##*:}
    out=$WORK/guidellm_${mode}_c$conc
    mkdir -p "$out"
    log "guidellm $mode c=$conc n=$n"
    timeout 300 "$CVENV/bin/guidellm" run \
      --backend "kind=openai_http,target=$URL,model=$MODEL,stream=$stream,request_format=/v1/chat/completions" \
      --tokenizer "{\"kind\": \"huggingface_auto\", \"model\": \"$TOK\"}" \
      --data "kind=synthetic_text,prompt_tokens=128,output_tokens=16" \
      --profile "kind=concurrent,streams=$conc" \
      --constraint "kind=max_requests,count=$n" \
      --output "{\"kind\": \"json\", \"path\": \"$out/benchmarks.json\"}" \
      --disable-console-interactive > "$out/guidellm.log" 2>&1
    rc=$?
    if [ -s "$out/benchmarks.json" ]; then
      "$CPY" "$HELPER" guidellm "$out/benchmarks.json" "$mode" "$conc" "$n" "$ROWS" --version "$GUIDELLM_VERSION"
    else
      "$CPY" "$HELPER" fail "guidellm $GUIDELLM_VERSION" "$mode" "$conc" "$n" \
        "exit $rc, no report; log: $out/guidellm.log: $(tail -c 300 "$out/guidellm.log" | tr '\n' ' ')" "$ROWS"
    fi
  done
done

# ---- 5. aiperf ------------------------------------------------------------------------------------
for stream in true false; do
  mode=$([ $stream = true ] && echo stream || echo non-stream)
  for level in $LEVELS; do
    conc=${level%%:*}; n=${level##*:}
    out=$WORK/aiperf_${mode}_c$conc
    mkdir -p "$out"
    log "aiperf $mode c=$conc n=$n"
    # Not offline: aiperf 0.13 in offline mode looks every tokenizer name up in the hub cache, local
    # folders included, and fails; online it takes a path as local without asking the hub.
    env -u HF_HUB_OFFLINE -u TRANSFORMERS_OFFLINE timeout 300 "$CVENV/bin/aiperf" profile \
      --model "$MODEL" --url "$URL" --endpoint-type chat $([ $stream = true ] && echo --streaming) \
      --tokenizer "$TOK" --apply-chat-template \
      --synthetic-input-tokens-mean 128 --synthetic-input-tokens-stddev 0 \
      --output-tokens-mean 16 --output-tokens-stddev 0 \
      --concurrency "$conc" --request-count "$n" --random-seed 0 \
      --artifact-dir "$out" --ui-type none > "$out/aiperf.log" 2>&1
    rc=$?
    if [ -n "$(find "$out" -name profile_export_aiperf.json -print -quit)" ]; then
      "$CPY" "$HELPER" aiperf "$out" "$mode" "$conc" "$n" "$ROWS" --version "$AIPERF_VERSION"
    else
      "$CPY" "$HELPER" fail "aiperf $AIPERF_VERSION" "$mode" "$conc" "$n" \
        "exit $rc, no report; log: $out/aiperf.log: $(tail -c 300 "$out/aiperf.log" | tr '\n' ' ')" "$ROWS"
    fi
  done
done

# ---- 6. the openai client -------------------------------------------------------------------------
log "openai client: structured outputs and a tool call"
"$PY" "$HELPER" openai "$URL/v1" "$MODEL" "$ROWS" ||
  "$PY" "$HELPER" fail openai "parse" 1 1 "the openai checks crashed (exit $?)" "$ROWS"

# ---- 7. the report --------------------------------------------------------------------------------
stop_server
# Every 4xx/5xx the server answered (uvicorn's access log), counted by request line: informational
# (a client's probe the server refuses shows here even when the client copes), the rows decide.
ERRS=$(grep -E '" [45][0-9][0-9] ' "$SERVER_LOG" | sed -E 's/.* - "(.*)" ([0-9]{3}) .*/\1 -> \2/' | sort | uniq -c |
       awk '{n = $1; $1 = ""; printf "%s%dx%s", sep, n, $0; sep = "; "}')
log "done in $((SECONDS - T0)) s; server log: $SERVER_LOG; its 4xx/5xx answers: ${ERRS:-none}"
"$PY" "$HELPER" report "$ROWS" --json "$JSON_OUT" --meta "model=$MODEL" --meta "server=$URL" \
  --meta "work=$WORK" --meta "seconds=$((SECONDS - T0))" --meta "server_4xx_5xx=${ERRS:-none}"
