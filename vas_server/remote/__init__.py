"""Remote mode: VAS over a base behind an OpenAI-compatible API (docs/SERVER.md, "VAS over a
remote base"). upstream: the HTTP calls; sampling: one exact steered draw; scoring: the value
runtime batched across token loops; draft: exact draft-and-verify of several tokens per call; engine_core:
the engine core AsyncLLM drives; serve: startup."""
