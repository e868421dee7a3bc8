#!/usr/bin/env bash
# `vas-server serve` as a user runs it, eager (the CPU default) and then with --no-enforce-eager
# (vLLM's compiled forward): startup time, the startup line that says which forward VAS steers,
# and the greedy answers to the same chat requests (plain, vas_weights, two presets), which must
# be the same text. Extra arguments go to both servers, e.g. `--dtype float32` (bfloat16 results
# of a compiled and an eager forward differ in rounding, so greedy text may part at a near-tie).
#
#   bash benchmarks/serve_compiled_check.sh --dtype float32
set -euo pipefail
cd "$(dirname "$0")/.."
make setup >/dev/null
request() {  # port model extra-json
  curl -s "localhost:$1/v1/chat/completions" -H 'Content-Type: application/json' -d "{\"model\": \"$2\",
    \"max_tokens\": 40, \"temperature\": 0, \"messages\": [{\"role\": \"user\", \"content\": \"How was your weekend?\"}] $3}" |
    python3 -c "import json, sys; d = json.load(sys.stdin); print(d['model'], json.dumps(d.get('vas')), repr(d['choices'][0]['message']['content']))"
}
mkdir -p build
for mode in eager compiled; do
  port=$([ $mode = eager ] && echo 8201 || echo 8202)
  flag=$([ $mode = eager ] && echo "" || echo "--no-enforce-eager")
  log=build/serve_$mode.log
  start=$(date +%s)
  .venv/bin/vas-server serve --port "$port" $flag "$@" > "$log" 2>&1 &
  pid=$!
  until grep -q "vas-server ready" "$log"; do
    sleep 1
    kill -0 $pid 2>/dev/null || { echo "server died"; tail -20 "$log"; exit 1; }
  done
  echo "== $mode: ready after $(( $(date +%s) - start )) s"
  grep -o "VAS steers the base's.*" "$log"
  request $port SmolLM2-135M-Instruct "" | tee build/answers_$mode.txt
  request $port SmolLM2-135M-Instruct ', "vas_weights": {"positive": 4.0}' | tee -a build/answers_$mode.txt
  request $port cheerful "" | tee -a build/answers_$mode.txt
  request $port positive "" | tee -a build/answers_$mode.txt
  kill $pid; wait $pid 2>/dev/null || true
done
if cmp -s build/answers_eager.txt build/answers_compiled.txt; then echo "same answers"; else echo "answers differ"; exit 1; fi
