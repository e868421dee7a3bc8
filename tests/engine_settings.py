"""The settings every test engine shares (tests/conftest.py's fixtures and the modules that start
engines of their own): float32, a short context and a deliberately small KV cache."""

from __future__ import annotations

MAX_MODEL_LEN = 512
KV_BLOCKS = 6  # x 128 tokens (the CPU block size) = 768 tokens of base KV cache: 16 concurrent requests must preempt
LIKED_TOKEN_TEXT = " good"  # the token the "liker" value models value


def engine_overrides() -> dict:
    return dict(dtype="float32", max_model_len=MAX_MODEL_LEN, num_gpu_blocks_override=KV_BLOCKS,
                max_num_seqs=16, seed=0, disable_log_stats=True)
