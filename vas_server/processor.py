"""VASLogitsProcessor: Value Augmented Sampling as a vLLM logits processor, for both interfaces
of vLLM 0.32. This is the class named in `--logits-processors`.

vLLM 0.32 runs one of two model runners, and each has its own logits-processor interface: the V1
runner (what the CPU build runs) and Model Runner V2 (the GPU default). The class subclasses
both interfaces' base classes, so either runner's loader accepts it, and constructing it builds
the implementation for the runner of the engine, read from `vllm_config.use_v2_model_runner`:
vas_server.processor_v1.V1Processor or vas_server.processor_v2.V2Processor. Both steer with
vas_server.steering (one rule, one value runtime); only their bookkeeping differs.

Importing this module loads no model: vLLM imports the class in the API process too, for
`validate_params`. Value models are loaded in the worker, when the processor is built.
"""

from __future__ import annotations

from vllm.v1.sample.logits_processor import LogitsProcessor as V1Interface
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2Interface

from vas_server.params import VASRequest, is_admitted


class VASLogitsProcessor(V1Interface, V2Interface):
    def __new__(cls, vllm_config, *args):
        if vllm_config.use_v2_model_runner:
            from vas_server.processor_v2 import V2Processor

            return V2Processor(vllm_config, *args)
        from vas_server.processor_v1 import V1Processor

        return V1Processor(vllm_config, *args)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """vLLM's admission check, in the API process, with the request alone: settings the
        middleware validated are stamped and not checked again; any others are validated here
        (vas_server.params: one validation per request path)."""
        if not is_admitted(sampling_params.extra_args):
            VASRequest.from_extra_args(sampling_params.extra_args)


class VASWorkerExtension:
    """Mixed into vLLM's worker class (engine arg `worker_extension_cls`), so the API process can
    read the processor's counters with `engine.collective_rpc("vas_stats")`."""

    def vas_stats(self) -> dict:
        from vas_server.processor_v1 import V1Processor
        from vas_server.processor_v2 import V2Processor

        runner = self.model_runner
        if hasattr(runner, "input_batch"):  # the V1 runner
            processors = runner.input_batch.logitsprocs.non_argmax_invariant
        else:  # Model Runner V2
            processors = runner.sampler.logits_processors
        proc = next((p for p in processors if isinstance(p, (V1Processor, V2Processor))), None)
        return proc.stats() if proc is not None else {}
