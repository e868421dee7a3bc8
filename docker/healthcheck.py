"""HEALTHCHECK of both images: exit 0 iff the server's /health answers 200 (vLLM's route, open
without the API key). Python rather than curl, which neither image needs otherwise."""

import os
import sys
import urllib.request

try:
    with urllib.request.urlopen(f"http://127.0.0.1:{os.environ.get('PORT', '8000')}/health", timeout=4) as answer:
        sys.exit(0 if answer.status == 200 else 1)
except OSError:
    sys.exit(1)
