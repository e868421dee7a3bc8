"""The worker side: what runs inside vLLM's engine (docs/ARCHITECTURE.md).

The logits processor (`processor`, for both runner interfaces: `processor_v1`, `processor_v2`),
its per-step steering (`steering`) and value runtime (`runtime_factory`), the hidden-state tap on
the base's forward (`hidden_states`, `tap_models`, with `tp_heads` and `pp_stage` under tensor
and pipeline parallelism), the startup checks (`compatibility`), the worker RPC
(`worker_extension`) and heap trimming (`heap`). Nothing here imports vas_server.http.
"""
