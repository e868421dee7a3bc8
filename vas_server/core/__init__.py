"""The inference core of VAS: the checkpoint format (vas.json + safetensors), value-model trunks
and heads, the rule that turns values into logits, the value runtime that scores candidates, and
the embedded base model's conversion. It imports nothing of the server (vas_server outside core)
nor of the tools (value_models); both build on it (docs/ARCHITECTURE.md, "Layers")."""
