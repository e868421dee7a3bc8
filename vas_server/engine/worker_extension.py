"""VASWorkerExtension: the worker RPCs that /metrics and vas_explain read (engine arg `worker_extension_cls`)."""

from __future__ import annotations


class VASWorkerExtension:
    """Mixed into vLLM's worker class (engine arg `worker_extension_cls`), so the API process can
    read the processor's counters with `engine.collective_rpc("vas_stats")`."""

    def vas_stats(self) -> dict:
        from vas_server.engine.processor import VASLogitsProcessor

        runner = self.model_runner
        if hasattr(runner, "input_batch"):  # the V1 runner: it tells the processor of removals
            processors = runner.input_batch.logitsprocs.non_argmax_invariant
            live = {}
        else:  # Model Runner V2: only the runner knows which of its request indices are occupied
            processors = runner.sampler.logits_processors
            live = {"live_req_indices": runner.req_states.index_to_req_id.keys()}
        proc = next((p for p in processors if isinstance(p, VASLogitsProcessor)), None)
        return proc.stats(**live) if proc is not None else {}

    def vas_explain(self, key: str) -> dict | None:
        """The per-token record of the request the middleware named `key` (vas_explain), once;
        None where there is none (another rank or pipeline stage, or an unknown key)."""
        from vas_server.engine.processor import VASLogitsProcessor

        runner = self.model_runner
        processors = (runner.input_batch.logitsprocs.non_argmax_invariant if hasattr(runner, "input_batch")
                      else runner.sampler.logits_processors)
        proc = next((p for p in processors if isinstance(p, VASLogitsProcessor)), None)
        return proc.steering.explanations.take(key) if proc is not None else None
