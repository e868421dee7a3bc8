"""The HTTP side: what runs in vLLM's API process around its OpenAI server (docs/ARCHITECTURE.md).

The ASGI middleware (`middleware`) and its parts: the raw-ASGI plumbing (`asgi`), auth (`auth`),
the body guard (`request_guard`), the `vas_*` field rewrite (`steering_fields`), model cards
(`model_cards`), metrics (`metrics`) and the view of the server it reads (`server_view`).
Nothing here imports vas_server.engine.
"""
