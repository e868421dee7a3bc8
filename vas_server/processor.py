"""The names `vllm serve` takes (--logits-processors, --worker-extension-cls); see vas_server.engine."""
from vas_server.engine import processor_v1, processor_v2  # noqa: F401 - each registers its runner's subclass
from vas_server.engine.processor import VASLogitsProcessor
from vas_server.engine.worker_extension import VASWorkerExtension

__all__ = ["VASLogitsProcessor", "VASWorkerExtension"]
