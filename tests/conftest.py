"""Shared fixtures: tiny models built on the fly and one vLLM engine per kind per session.

Engines run the real vLLM (CPU build) in float32 with a deliberately small KV cache
(`num_gpu_blocks_override`), so a burst of concurrent requests gets preempted.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest


from engine_settings import LIKED_TOKEN_TEXT, engine_overrides
from tiny_models import build_llama, build_tokenizer

from vas_server.core.format import TrunkSpec
from value_models.synthetic import random_value_model, token_lover

# vLLM reads these at engine start; set before any engine exists.
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")



@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny")
    build_tokenizer(root / "tokenizer")
    build_llama(root / "base", root / "tokenizer", seed=0)
    build_llama(root / "standalone", root / "tokenizer", seed=1, num_layers=1)
    return root


@pytest.fixture(scope="session")
def tiny_base(tiny_dir) -> Path:
    return tiny_dir / "base"


@pytest.fixture(scope="session")
def liked_token(tiny_base) -> int:
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(str(tiny_base)).encode(LIKED_TOKEN_TEXT, add_special_tokens=False)
    assert len(ids) == 1, ids
    return ids[0]


@pytest.fixture(scope="session")
def value_models(tiny_dir, tiny_base, liked_token) -> dict[str, str]:
    """name -> checkpoint dir: random state+token heads on a base_prefix trunk, a random state
    head on a standalone trunk, and a head that values one token."""
    vm = tiny_dir / "value_models"
    return {
        "prefix": str(random_value_model(vm / "prefix", tiny_base,
                                         [("s1", "state"), ("s2", "state"), ("t1", "token"), ("t2", "token")],
                                         seed=10, trunk=TrunkSpec("base_prefix", num_layers=1), scale=3.0)),
        "alone": str(random_value_model(vm / "alone", tiny_base, [("s3", "state")], seed=11,
                                        trunk=TrunkSpec("standalone"), standalone_dir=tiny_dir / "standalone",
                                        scale=3.0)),
        "liker": str(token_lover(vm / "liker", tiny_base, "likes", liked_token)),
    }


@pytest.fixture(scope="session")
def vas_llm(tiny_base, value_models):
    from vllm import LLM

    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_kwargs

    llm = LLM(**engine_kwargs(str(tiny_base), VASConfig(value_models=value_models), **engine_overrides()))
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def plain_llm(tiny_base):
    from vllm import LLM

    from vas_server.engine_args import engine_kwargs

    llm = LLM(**engine_kwargs(str(tiny_base), None, **engine_overrides()))
    yield llm
    del llm
    gc.collect()


@pytest.fixture(scope="session")
def prompts(tiny_base) -> list[list[int]]:
    """Token-id prompts of different lengths."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    texts = ["Hello, how are you", "The quick brown fox", "What is the capital of France?", "Good",
             "I love sunny days and happy people. This is", "Short answers", "Paris is the", "This is terrible"]
    return [tok.encode(t, add_special_tokens=False) for t in texts]


# -- the HTTP server (tests/http_server.py), one per session ----------------------------------------


@pytest.fixture(scope="session")
def server(tmp_path_factory, tiny_base, value_models):
    from http_server import serve_for_tests

    yield from serve_for_tests(tmp_path_factory.mktemp("server"), tiny_base, value_models)


@pytest.fixture(scope="session")
def client(server):
    return server.client()


@pytest.fixture(scope="session")
def model() -> str:
    from http_server import SERVED_NAME

    return SERVED_NAME


@pytest.fixture(scope="session")
def tokenizer(tiny_base):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_base))
