#!/usr/bin/env bash
# Entrypoint of both images (Dockerfile, docker/Dockerfile.cpu): serve on all interfaces.
# Arguments are passed to `vas-server serve` (a model, --value-model, any `vllm serve` flag);
# VAS_SERVER_API_KEY, if set, protects the /v1 routes.
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/vas-server serve --host 0.0.0.0 --port "${PORT:-8000}" "$@"
