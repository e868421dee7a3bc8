"""VASWorkerExtension: the worker RPC that /metrics reads (engine arg `worker_extension_cls`)."""

from __future__ import annotations


class VASWorkerExtension:
    """Mixed into vLLM's worker class (engine arg `worker_extension_cls`), so the API process can
    read the processor's counters with `engine.collective_rpc("vas_stats")`."""

    def vas_stats(self) -> dict:
        from vas_server.engine.processor import VASLogitsProcessor

        runner = self.model_runner
        if hasattr(runner, "input_batch"):  # the V1 runner
            processors = runner.input_batch.logitsprocs.non_argmax_invariant
        else:  # Model Runner V2
            processors = runner.sampler.logits_processors
        proc = next((p for p in processors if isinstance(p, VASLogitsProcessor)), None)
        return proc.stats() if proc is not None else {}
