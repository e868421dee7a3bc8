"""The names `vllm serve` takes (--logits-processors, --worker-extension-cls); see vas_server.engine."""
import vas_server.engine.processor_v1  # noqa: F401 - registers the V1 runner's subclass (VASLogitsProcessor.runners)
import vas_server.engine.processor_v2  # noqa: F401 - registers Model Runner V2's
from vas_server.engine.processor import VASLogitsProcessor
from vas_server.engine.worker_extension import VASWorkerExtension

__all__ = ["VASLogitsProcessor", "VASWorkerExtension"]
