#!/usr/bin/env bash
# What the README promises about Docker and fresh machines, checked with a real Docker engine.
# Not part of `make test`: it needs root and a Docker daemon. Results: docs/SERVER.md, "Docker".
#
#   scripts/docker_check.sh image   the README's CPU build line, then its run line as written:
#                                   health, 401 without the key, a steered answer that differs
#                                   from the plain one at the same seed, the HEALTHCHECK's status,
#                                   `docker stop` time and exit code, image size (< 3 GB); then
#                                   your own models mounted with -v (a tiny model built here)
#   scripts/docker_check.sh gpu     the same for the GPU image (Dockerfile), on a machine with a
#                                   GPU and the NVIDIA container toolkit (no size goal)
#   scripts/docker_check.sh fresh   a container of the bare base image (python:3.11-slim) as a
#                                   fresh machine: the README's prerequisites line, a clone of
#                                   this repository's HEAD, `make serve` and the README's steered
#                                   curl, then `make test`, all as written
#
# VAS_TORCH_INDEX, if set, goes to the CPU build (--build-arg) and to setup in the fresh
# container; builds and the fresh container then use the host's network, so that an index on
# this machine's loopback (a local mirror, or a stand-in that serves a wheel on disk) is reachable.
# Logs go to build/docker-check/.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
MODE=${1:-image}
LOGS=$REPO/build/docker-check
mkdir -p "$LOGS"
NAME=vas-docker-check
FAILS=0

now() { date +%s.%N; }
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
pass() { echo "PASS $*"; }
fail() { echo "FAIL $*"; FAILS=$((FAILS + 1)); }

# The first README line that starts with the pattern, without its trailing comment.
readme_line() {
    local line
    line=$(grep -m1 -E "^$1" README.md | sed -E 's/[[:space:]]+#.*$//')
    [ -n "$line" ] || { echo "README.md has no line matching ^$1" >&2; exit 2; }
    echo "$line"
}

# The README's bash block that contains a string (the steered curl), as one command.
readme_block() {
    python3 - "$1" <<'PY'
import re, sys
blocks = re.findall(r"```bash\n(.*?)```", open("README.md").read(), re.S)
print(next(b for b in blocks if sys.argv[1] in b and b.lstrip().startswith("curl")).strip())
PY
}

port_free() { ! (exec 3<>/dev/tcp/127.0.0.1/$1) 2>/dev/null; }

# Wait for GET /health on a port to answer 200 while a container lives; prints the seconds.
wait_ready() {
    local port=$1 container=$2 limit=${3:-600} t0
    t0=$(now)
    while ! curl -sf "http://localhost:$port/health" >/dev/null; do
        if [ -n "$container" ] && [ -z "$(docker ps -q -f "name=^$container\$")" ]; then
            echo "container $container exited" >&2; return 1
        fi
        if [ "$(since "$t0" | cut -d. -f1)" -ge "$limit" ]; then echo "not ready after $limit s" >&2; return 1; fi
        sleep 0.5
    done
    since "$t0"
}

answer() {  # answer PORT KEY ROUTE BODY -> the first choice's text
    curl -s -m 300 "http://localhost:$1/v1/$3" -H 'Content-Type: application/json' \
        ${2:+-H "Authorization: Bearer $2"} -d "$4" \
        | python3 -c "import json, sys; c = json.load(sys.stdin)['choices'][0]; print(c['message']['content'] if 'message' in c else c['text'])"
}

image_mode() {
    local flavour=$1 build run key size ready healthy t0 stop_s code body tag tiny
    if [ "$flavour" = cpu ]; then
        build=$(readme_line 'docker build -f docker/Dockerfile.cpu')
        run=$(readme_line 'docker run .* vas-server-cpu$')
    else
        build=$(readme_line 'docker build -t vas-server \.')
        run=$(readme_line 'docker run --gpus all .* vas-server$')
    fi
    tag=${run##* }
    extra="--network host${VAS_TORCH_INDEX:+ --build-arg VAS_TORCH_INDEX=$VAS_TORCH_INDEX}"
    echo "build: $build   (+ $extra)"
    t0=$(now)
    ${build/docker build/docker build $extra} >"$LOGS/build-$flavour.log" 2>&1 \
        || { fail "build (log: $LOGS/build-$flavour.log)"; tail -20 "$LOGS/build-$flavour.log"; return; }
    pass "build in $(since "$t0") s"
    size=$(docker image inspect -f '{{.Size}}' "$tag")
    size=$(python3 -c "print(f'{$size / 1e9:.2f}')")
    if [ "$flavour" = gpu ] || python3 -c "import sys; sys.exit(not $size < 3)"; then pass "image size $size GB"
    else fail "image size $size GB (goal: under 3)"; fi

    port_free 8000 || { fail "port 8000 is taken on this machine; stop what listens there"; return; }
    docker rm -f "$NAME" >/dev/null 2>&1 || true
    echo "run: $run"
    key=$(sed -nE 's/.*VAS_SERVER_API_KEY=([^ ]+).*/\1/p' <<<"$run")
    ${run/docker run/docker run -d --name $NAME} >/dev/null
    if ready=$(wait_ready 8000 "$NAME"); then pass "ready (GET /health 200) $ready s after docker run"
    else fail "never ready"; docker logs "$NAME" 2>&1 | tail -30; docker rm -f "$NAME" >/dev/null; return; fi

    if [ -n "$key" ]; then
        code=$(curl -s -o /dev/null -w '%{http_code}' http://localhost:8000/v1/models)
        [ "$code" = 401 ] && pass "GET /v1/models without the key: 401" || fail "GET /v1/models without the key: $code"
        code=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $key" http://localhost:8000/v1/models)
        [ "$code" = 200 ] && pass "GET /v1/models with the key: 200" || fail "GET /v1/models with the key: $code"
    fi
    body='"model": "SmolLM2-135M-Instruct", "max_tokens": 48, "seed": 1, "messages": [{"role": "user", "content": "How was your weekend?"}]'
    local plain steered
    plain=$(answer 8000 "$key" chat/completions "{$body}") || plain="(no answer)"
    steered=$(answer 8000 "$key" chat/completions "{$body, \"vas_weights\": {\"positive\": 4.0}}") || steered="(no answer)"
    printf '  plain:   %s\n  steered: %s\n' "${plain:0:120}" "${steered:0:120}"
    [ -n "$plain" ] && [ "$plain" != "(no answer)" ] && [ "$steered" != "(no answer)" ] && [ "$plain" != "$steered" ] \
        && pass "steered (positive 4) differs from plain at seed 1" || fail "steered vs plain"

    t0=$(now)
    healthy=""
    while [ "$(since "$t0" | cut -d. -f1)" -lt 120 ]; do
        healthy=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
        [ "$healthy" = healthy ] && break
        sleep 2
    done
    [ "$healthy" = healthy ] && pass "HEALTHCHECK status: healthy" || fail "HEALTHCHECK status: $healthy"

    t0=$(now)
    docker stop "$NAME" >/dev/null
    stop_s=$(since "$t0")
    code=$(docker inspect -f '{{.State.ExitCode}}' "$NAME")
    if [ "$code" = 0 ] && python3 -c "import sys; sys.exit(not $stop_s < 5)"; then pass "docker stop: exit 0 in $stop_s s"
    else fail "docker stop: exit $code in $stop_s s (137 is Docker's SIGKILL after 10 s)"; docker logs "$NAME" 2>&1 | tail -10; fi
    docker rm "$NAME" >/dev/null

    # Your own base and value models, mounted: a tiny Llama and a head that values " good",
    # built here with the image's own Python and the test suite's model builders.
    tiny=$(mktemp -d)
    docker run --rm -v "$tiny:/models" -v "$REPO/tests:/tests:ro" --entrypoint .venv/bin/python "$tag" -c '
import sys; sys.path.insert(0, "/tests")
from pathlib import Path
from tiny_models import build_llama, build_tokenizer
from transformers import AutoTokenizer
from value_models.synthetic import token_lover
build_tokenizer(Path("/tmp/tokenizer"))
build_llama(Path("/models/base"), Path("/tmp/tokenizer"), seed=0)
good, = AutoTokenizer.from_pretrained("/models/base").encode(" good", add_special_tokens=False)
token_lover(Path("/models/likes"), Path("/models/base"), "likes", good)
' >"$LOGS/tiny-$flavour.log" 2>&1 || { fail "building the tiny models (log: $LOGS/tiny-$flavour.log)"; return; }
    local mounted=${run%% "$tag"}
    mounted="${mounted/docker run/docker run -d --name $NAME} -v $tiny:/models $tag /models/base --value-model likes=/models/likes"
    echo "run: $mounted"
    $mounted >/dev/null
    if ready=$(wait_ready 8000 "$NAME"); then
        pass "mounted models ready in $ready s"
        local tbody='"model": "/models/base", "prompt": "Hello, how are you", "max_tokens": 8, "temperature": 0'
        plain=$(answer 8000 "$key" completions "{$tbody}") || plain="(no answer)"
        steered=$(answer 8000 "$key" completions "{$tbody, \"vas_weights\": {\"likes\": 8.0}, \"vas_top_k\": 256}") || steered="(no answer)"
        printf '  plain:   %q\n  steered: %q\n' "$plain" "$steered"
        [[ "$steered" == *good* && "$plain" != *good* ]] \
            && pass "mounted value model steers its base (' good' appears only when steered)" \
            || fail "mounted value model did not steer"
    else fail "mounted models never ready"; docker logs "$NAME" 2>&1 | tail -30; fi
    docker rm -f "$NAME" >/dev/null
    rm -rf "$tiny"
}

fresh_mode() {
    local prereq steer script t0
    prereq=$(readme_line 'sudo apt-get'); prereq=${prereq//sudo /}   # the container runs as root, without sudo
    steer=$(readme_block '"vas_weights": {"positive": 4.0}')
    port_free 8000 || { fail "port 8000 is taken on this machine; stop what listens there"; return; }
    script=$LOGS/fresh.sh
    cat >"$script" <<EOF
set -euo pipefail
t() { date +%s; }
T0=\$(t)
echo "== prerequisites: $prereq"
export DEBIAN_FRONTEND=noninteractive
$prereq >/dev/null
echo "prerequisites: \$((\$(t) - T0)) s"
git clone -q /src /root/vas-server
cd /root/vas-server
echo "== make serve"
T0=\$(t)
setsid make serve >/root/serve.log 2>&1 &
until curl -sf localhost:8000/health >/dev/null; do
    kill -0 \$! 2>/dev/null || { tail -30 /root/serve.log; echo "make serve exited"; exit 1; }
    sleep 1
done
echo "make serve: ready \$((\$(t) - T0)) s after it started (setup included)"
echo "== the README's steered curl"
$steer | tee /root/steered.json
echo
python3 -c "import json; d = json.load(open('/root/steered.json')); assert d['vas']['weights'] == {'positive': 4.0}, d; print('steered answer:', d['choices'][0]['message']['content'][:100])"
kill -INT -- -\$! ; wait \$! || true
echo "== make test"
T0=\$(t)
make test 2>&1 | tail -25
echo "make test: \$((\$(t) - T0)) s"
EOF
    echo "fresh container: python:3.11-slim, the README's prerequisites, then make serve and make test (log: $LOGS/fresh.log)"
    t0=$(now)
    if docker run --rm --network host --shm-size=8g ${VAS_TORCH_INDEX:+-e VAS_TORCH_INDEX} \
            -v "$REPO:/src:ro" -v "$script:/fresh.sh:ro" python:3.11-slim bash /fresh.sh >"$LOGS/fresh.log" 2>&1; then
        pass "fresh machine: prerequisites, make serve, steered curl, make test ($(since "$t0") s in all)"
    else
        fail "fresh machine ($(since "$t0") s)"
    fi
    grep -E "^(prerequisites|make serve|make test|steered answer|=+ .*(passed|failed|error))" "$LOGS/fresh.log" || true
}

case "$MODE" in
    image) image_mode cpu ;;
    gpu) image_mode gpu ;;
    fresh) fresh_mode ;;
    *) echo "usage: $0 image|gpu|fresh" >&2; exit 2 ;;
esac
[ "$FAILS" = 0 ] && echo "docker_check $MODE: all passed" || { echo "docker_check $MODE: $FAILS failed"; exit 1; }
