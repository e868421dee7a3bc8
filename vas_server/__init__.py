"""vas-server: Value Augmented Sampling as a vLLM logits processor plus an OpenAI-compatible server."""

__version__ = "0.1.0"
