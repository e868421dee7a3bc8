"""VASLogitsProcessor: Value Augmented Sampling as a vLLM logits processor, for both interfaces
of vLLM 0.32. This is the class named in `--logits-processors`.

vLLM 0.32 runs one of two model runners, and each has its own logits-processor interface: the V1
runner (what the CPU build runs) and Model Runner V2 (the GPU default). The class subclasses
both interfaces' base classes, so either runner's loader accepts it, and constructing it builds
the subclass for the runner of the engine, read from `vllm_config.use_v2_model_runner`:
vas_server.engine.processor_v1.V1Processor or vas_server.engine.processor_v2.V2Processor (so the
object is a VASLogitsProcessor too), which registered themselves in `VASLogitsProcessor.runners`.
Both steer with vas_server.engine.steering (one rule, one value runtime); only their bookkeeping
differs.

Importing this module loads no model: vLLM imports the class in the API process too, for
`validate_params`. Value models are loaded in the worker, when the processor is built.
"""

from __future__ import annotations

from vllm.v1.sample.logits_processor import LogitsProcessor as V1Interface
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsProcessor as V2Interface

from vas_server.params import VASRequest, is_admitted


class VASLogitsProcessor(V1Interface, V2Interface):
    # The subclass per runner, by `use_v2_model_runner`: each registers itself when its module is
    # imported (vas_server.processor, the name vLLM loads, imports both), so that this module
    # imports neither and the two do not import each other in a cycle (tests/test_layering.py).
    runners: dict[bool, type["VASLogitsProcessor"]] = {}

    def __new__(cls, vllm_config, *args):
        if cls is not VASLogitsProcessor:  # a subclass built directly
            return super().__new__(cls)
        runner_class = VASLogitsProcessor.runners.get(bool(vllm_config.use_v2_model_runner))
        if runner_class is None:
            raise RuntimeError("VASLogitsProcessor has no subclass for this model runner: load it as "
                               "vas_server.processor:VASLogitsProcessor, which imports both")
        # An instance of a subclass: Python then runs runner_class.__init__(vllm_config, *args).
        return super().__new__(runner_class)

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        """vLLM's admission check, in the API process, with the request alone: settings the
        middleware validated are stamped and not checked again; any others are validated here
        (vas_server.params: one validation per request path)."""
        if not is_admitted(sampling_params.extra_args):
            VASRequest.from_extra_args(sampling_params.extra_args)
