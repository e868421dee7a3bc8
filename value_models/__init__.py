"""The tools that make value models for VAS: sampling the frozen base, rewards, TD(λ) training
(`vas-train`), evaluation. The checkpoint format, trunks and heads they write are the inference
core's (vas_server.core: format, trunk, heads, model)."""
