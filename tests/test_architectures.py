"""The shared path and value-model training on every architecture family vLLM can tap, not only
Llama: a tiny random base per architecture (tests/tiny_models.py build_arch: Qwen3, Qwen3-MoE,
Phi-3, Granite, gpt-oss, Gemma 4), one real vLLM engine each (eager, float32), serving
  * "tok": random token heads at N = 1 (< all layers: an aux column and the base's own final norm);
  * "all": a random token head at N = 2 = all layers (compute_logits' own input);
  * "liker": a head that values one token;
  * "fit": what `vas-train score` + `vas-train fit` make from samples of that base.
Each is checked against transformers' implementation of the architecture:
  (a) the states the tap hands the scorer are the training path's states (TrainingTrunk);
  (b) greedy steered tokens equal tests/reference_vas.py (HF, no cache, the rule by hand);
  (c) the liker raises its token's count;
  (d) the fitted model loads on the shared path and steers as the reference says.
"""

from __future__ import annotations

import gc
import os
import sys

import cloudpickle
import pytest
import torch
from vllm import SamplingParams

from engine_settings import LIKED_TOKEN_TEXT, MAX_MODEL_LEN
from reference_vas import ReferenceValueModel, reference_greedy
from tiny_models import ARCHITECTURES, build_arch
from vas_server.core.format import TrunkSpec
from vas_server.params import make_extra_args
from value_models.synthetic import random_value_model, token_lover

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the probe functions run in the worker

TEXTS = ["Hello, how are you", "The quick brown fox", "What is the capital of France?",
         "I love sunny days and happy people. This is"]


def round_letters(prompt: str, response: str) -> float:
    """A reward written for this test: the share of round letters (o, a, e) in the response."""
    return sum(response.count(c) for c in "oae") / max(len(response), 1)


# (a)'s tolerance. gpt-oss: vLLM's CPU MoE kernel (SwiGLU with clamp, expert biases) sums in
# another order than transformers' loop over experts; its largest difference seen was 6.4e-4 on
# states of magnitude ~1 (the greedy tokens of (b) still agree exactly).
STATE_TOLERANCE = {"gpt_oss": 2e-3}


# Architectures of this module that vas_server.core.trunk also covers (the separate runtime).
SEPARATE_TRUNK_TYPES = ("qwen3",)


def _install_probe(worker):
    """Log, for every row a shared-path scorer steers, (prompt, outputs, layer, the state it read)."""
    runner = worker.model_runner
    procs = runner.input_batch.logitsprocs.non_argmax_invariant  # the V1 runner (CPU)
    proc = next(p for p in procs if type(p).__name__ == "V1Processor")
    log, read = [], []
    tap = proc.steering.tap
    original = tap.states

    def states(n, rows):
        out = original(n, rows)
        read.append((n, out.detach().clone()))
        return out

    tap.states = states
    for scorer in proc.steering.runtime.scorers:
        if type(scorer).__name__ != "SharedScorer":
            continue

        def logged(rows, candidates, step, score=scorer.score):
            read.clear()
            values = score(rows, candidates, step)
            for n, states_ in read:
                for row, i in zip(rows, step.batch_rows.tolist()):
                    log.append((list(row.tokens.prompt), list(row.tokens.outputs), n, states_[i].tolist()))
            return values

        scorer.score = logged
    worker.vas_probe_log = log
    return {getattr(s, "name", None) or s.model.name: type(s).__name__ for s in proc.steering.runtime.scorers}


def _take_log(worker):
    out = list(worker.vas_probe_log)
    worker.vas_probe_log.clear()
    return out


@pytest.fixture(scope="module", params=ARCHITECTURES)
def arch(request, tmp_path_factory, tiny_dir):
    """(kind, base dir, value models, engine) for one architecture; one engine at a time."""
    from transformers import AutoTokenizer
    from vllm import LLM

    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_kwargs

    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    base = build_arch(kind, root / "base", tiny_dir / "tokenizer", seed=3)
    tok = AutoTokenizer.from_pretrained(str(base))
    liked = tok.encode(LIKED_TOKEN_TEXT, add_special_tokens=False)[0]
    models = {
        "tok": str(random_value_model(root / "tok", base, [("t1", "token"), ("t2", "token")], seed=30,
                                      trunk=TrunkSpec("base_prefix", num_layers=1), scale=3.0)),
        "all": str(random_value_model(root / "all", base, [("a1", "token")], seed=31,
                                      trunk=TrunkSpec("base_prefix", num_layers=2), scale=3.0)),
        "liker": str(token_lover(root / "liker", base, "likes", liked)),
        "fit": str(_fitted(root, base, tok)),
    }
    if kind in SEPARATE_TRUNK_TYPES:  # a state head: the separate runtime's own trunk of this type
        models["state"] = str(random_value_model(root / "state", base, [("s1", "state"), ("t3", "token")], seed=32,
                                                 trunk=TrunkSpec("base_prefix", num_layers=1), scale=3.0))
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # the probe is a pickled function
    llm = LLM(**engine_kwargs(str(base), VASConfig(value_models=models), dtype="float32",
                              max_model_len=MAX_MODEL_LEN, max_num_seqs=8, seed=0, disable_log_stats=True,
                              enforce_eager=True))
    scorers = llm.collective_rpc(_install_probe)[0]
    prompts = [tok.encode(t, add_special_tokens=False) for t in TEXTS]
    yield kind, base, models, llm, scorers, prompts, liked
    del llm
    gc.collect()


def _fitted(root, base, tok):
    """`vas-train score` and `vas-train fit` (the CLI) on 16 responses sampled from the base with
    transformers (vas-train sample's records, without a second vLLM engine)."""
    from value_models.cli import main
    from value_models.records import Sample, write_samples
    from vas_server.core.format import tokenizer_identity
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    vocab_hash = tokenizer_identity(tok).vocab_hash
    torch.manual_seed(0)
    samples = []
    for text in TEXTS:
        prompt = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
        prompt = list(prompt["input_ids"] if isinstance(prompt, dict) or hasattr(prompt, "keys") else prompt)
        with torch.no_grad():
            out = lm.generate(torch.tensor([prompt]), do_sample=True, max_new_tokens=10, num_return_sequences=4,
                              pad_token_id=tok.pad_token_id)
        for row in out[:, len(prompt):].tolist():
            samples.append(Sample(text, prompt, tok.decode(row), row, "length", vocab_hash=vocab_hash))
    write_samples(root / "samples.jsonl", samples)
    main(["score", str(root / "samples.jsonl"), "--reward", "test_architectures:round_letters"])
    main(["fit", str(root / "samples.jsonl"), "--base", str(base), "--head", "round:token:test_architectures:round_letters",
          "--num-layers", "1", "--epochs", "2", "--batch-size", "8", "--validation-fraction", "0",
          "--checkpoint-every", "0", "--out", str(root / "fit")])
    return root / "fit"


def _greedy(weights, max_tokens: int = 12, top_k: int | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True,
                          extra_args=make_extra_args(weights, top_k) if weights else None)


def _generate(llm, prompts, params):
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs], llm.collective_rpc(_take_log)[0]


def test_tap_states_are_the_training_states(arch):
    """(a) Every state the shared path read, at N = 1 and N = all, is the training trunk's (HF)
    state at the same position, in float32 to 1e-4."""
    from value_models.training_trunk import TrainingTrunk, TrunkPlan

    kind, base, models, llm, scorers, prompts, _ = arch
    shared = {"tok": "SharedScorer", "all": "SharedScorer", "liker": "SharedScorer", "fit": "SharedScorer"}
    assert scorers == {**shared, **({"state": "TrunkScorer"} if kind in SEPARATE_TRUNK_TYPES else {})}
    _, log = _generate(llm, prompts, [_greedy({"t1": 2.0, "a1": -1.5}, 6)] * len(prompts))
    trunks = {n: TrainingTrunk(TrunkPlan("base_prefix", str(base), num_layers=n)) for n in (1, 2)}
    seen = {1: 0, 2: 0}
    for prompt, outputs, n, state in log:
        tokens = torch.tensor([prompt + outputs])
        expected = trunks[n].hidden_states(tokens)[0, -1].detach()
        tol = STATE_TOLERANCE.get(kind, 1e-4)
        torch.testing.assert_close(torch.tensor(state), expected, atol=tol, rtol=tol,
                                       msg=lambda m: f"{kind} N={n}: {m}")
        seen[n] += 1
    assert seen[1] == seen[2] == len(prompts) * 6, seen


@pytest.mark.parametrize("heads", [{"t1": 3.0, "t2": -2.0}, {"a1": 3.0}], ids=["N=1", "N=all"])
def test_greedy_steering_matches_the_reference(arch, heads):
    """(b) Greedy steered tokens equal the HF no-cache reference, and steering changed them."""
    models = arch[2]
    model = models["tok" if "t1" in heads else "all"]
    _assert_steers_like_the_reference(arch, model, heads)


def test_separate_runtime_matches_the_reference(arch):
    """(b) on the separate runtime: a state head and a token head on the value model's own trunk
    (vas_server.core.trunk, with its value cache) steer as the reference computes them."""
    kind, _, models, *_ = arch
    if kind not in SEPARATE_TRUNK_TYPES:
        pytest.skip(f"vas_server.core.trunk does not cover {kind}: refused at startup "
                    "(test_architecture_without_a_path_is_refused)")
    _assert_steers_like_the_reference(arch, models["state"], {"s1": 2.0, "t3": -1.5})


def _assert_steers_like_the_reference(arch, model: str, heads: dict[str, float]) -> None:
    """Greedy tokens steered by `model`'s `heads` equal the HF no-cache reference's, and differ
    from the unsteered ones."""
    kind, base, _, llm, _, prompts, _ = arch
    refs = {"m": ReferenceValueModel(model, str(base))}
    steered, _ = _generate(llm, prompts, _greedy(heads))
    plain, _ = _generate(llm, prompts, _greedy(None))
    for p, tokens in zip(prompts, steered):
        assert tokens == reference_greedy(str(base), refs, heads, p, 12), kind
    assert steered != plain, f"{kind}: steering changed nothing"


def test_token_lover_raises_its_token(arch):
    """(c) A head that values one token makes it more frequent."""
    kind, _, _, llm, _, prompts, liked = arch
    plain, _ = _generate(llm, prompts, _greedy(None, 16))
    # K = 128 of the 384 tokens: the liked token is a candidate at most steps of a random base.
    liked_runs, _ = _generate(llm, prompts, _greedy({"likes": 8.0}, 16, top_k=128))
    before, after = sum(t.count(liked) for t in plain), sum(t.count(liked) for t in liked_runs)
    assert after >= before + len(prompts), (kind, before, after)


def test_fitted_value_model_serves_on_the_shared_path(arch):
    """(d) vas-train fit's model (it records the base it was trained on) steers on the shared path
    exactly as the reference computes it."""
    from vas_server.core.format import load_spec

    kind, base, models, llm, scorers, prompts, _ = arch
    spec = load_spec(models["fit"])
    assert (spec.trunk.base_num_layers, spec.trunk.num_layers) == (2, 1) and spec.trunk.base_architecture
    assert scorers["fit"] == "SharedScorer"
    heads = {"round": 6.0}
    steered, _ = _generate(llm, prompts, _greedy(heads))
    refs = {"m": ReferenceValueModel(models["fit"], str(base))}
    for p, tokens in zip(prompts, steered):
        assert tokens == reference_greedy(str(base), refs, heads, p, 12), kind


# -- refused at startup (vas_server.engine.compatibility), before any engine process starts ------------


def _engine_config(base, models: dict[str, str]):
    """vLLM's engine configuration for `base` with these value models: vLLM runs the plugin's
    configuration check (vas_server.engine.compatibility) while it builds it."""
    from vllm.engine.arg_utils import EngineArgs

    from vas_server.config import VASConfig
    from vas_server.engine_args import engine_kwargs

    kwargs = engine_kwargs(str(base), VASConfig(value_models=models), dtype="float32", max_model_len=MAX_MODEL_LEN)
    return EngineArgs(**kwargs).create_engine_config()


@pytest.fixture(scope="module")
def other_bases(tmp_path_factory, tiny_dir):
    """A tiny Qwen3 and Granite (tap, shared path) and Gemma 3 (vLLM has no aux states for it)."""
    import transformers as T

    from tiny_models import build_llama

    root = tmp_path_factory.mktemp("other_bases")
    bases = {kind: build_arch(kind, root / kind, tiny_dir / "tokenizer", seed=4) for kind in ("qwen3", "granite")}
    bases["llama3"] = build_llama(root / "llama3", tiny_dir / "tokenizer", seed=5, num_layers=3)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_dir / "tokenizer"))
    config = T.Gemma3TextConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1, head_dim=64, sliding_window=128)
    config.architectures = ["Gemma3ForCausalLM"]
    T.Gemma3ForCausalLM(config).save_pretrained(str(root / "gemma3"))
    tok.save_pretrained(str(root / "gemma3"))
    bases["gemma3"] = root / "gemma3"
    return root, bases


def test_value_model_of_another_base_is_refused(other_bases, tiny_base, value_models):
    """A base_prefix value model records the base it was trained on: another architecture, or
    the same one at another depth, fails the engine's start naming both."""
    root, bases = other_bases
    llama_tokens = str(random_value_model(root / "on_llama", tiny_base, [("t", "token")], seed=1,
                                          trunk=TrunkSpec("base_prefix", num_layers=1)))
    with pytest.raises(ValueError, match=r"trained on a base_prefix trunk of LlamaForCausalLM \(2 layers.*"
                                         r"served base is Qwen3ForCausalLM \(2 layers"):
        _engine_config(bases["qwen3"], {"m": llama_tokens})
    with pytest.raises(ValueError, match=r"LlamaForCausalLM \(2 layers.*served base is LlamaForCausalLM \(3 layers"):
        _engine_config(bases["llama3"], {"m": llama_tokens})
    # The base it was trained on: accepted (the conftest engines serve such models).
    _engine_config(tiny_base, {"m": llama_tokens})


def test_architecture_without_a_path_is_refused(other_bases):
    """The shared path on an architecture whose vLLM class has no aux hidden states, and the
    separate runtime on one its trunk does not cover, fail the start naming what would work."""
    root, bases = other_bases
    on_gemma3 = str(random_value_model(root / "on_gemma3", bases["gemma3"], [("t", "token")], seed=2,
                                       trunk=TrunkSpec("base_prefix", num_layers=1)))
    with pytest.raises(ValueError, match=r"'m' takes the shared path .* vLLM's Gemma3ForCausalLM .* has none\. "
                                         r"It can still be served with a standalone trunk"):
        _engine_config(bases["gemma3"], {"m": on_gemma3})
    state_on_granite = str(random_value_model(root / "state_on_granite", bases["granite"], [("s", "state")], seed=3,
                                              trunk=TrunkSpec("base_prefix", num_layers=1)))
    with pytest.raises(ValueError, match=r"'m' needs the separate runtime \(a state head\).*GraniteForCausalLM.*"
                                         r"got 'granite'.*take the shared path instead"):
        _engine_config(bases["granite"], {"m": state_on_granite})
    # Qwen3 is one of the separate runtime's trunk types, and Granite's token heads take the shared path.
    state_on_qwen3 = str(random_value_model(root / "state_on_qwen3", bases["qwen3"], [("s", "state")], seed=4,
                                            trunk=TrunkSpec("base_prefix", num_layers=1)))
    tokens_on_granite = str(random_value_model(root / "tokens_on_granite", bases["granite"], [("t", "token")], seed=5,
                                               trunk=TrunkSpec("base_prefix", num_layers=2)))
    _engine_config(bases["qwen3"], {"m": state_on_qwen3})
    _engine_config(bases["granite"], {"m": tokens_on_granite})


@pytest.mark.parametrize("num_layers", [1, 2])
def test_separate_runtime_trunk_on_qwen3(other_bases, num_layers):
    """vas_server.core.trunk's qwen3 trunk (per-head q/k norms) computes transformers' states."""
    from value_models.training_trunk import TrainingTrunk, TrunkPlan
    from vas_server.core.trunk import load_trunk

    _, bases = other_bases
    tokens = torch.randint(5, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    trained = TrainingTrunk(TrunkPlan("base_prefix", str(bases["qwen3"]), num_layers=num_layers)).hidden_states(tokens)
    served = load_trunk(bases["qwen3"], num_layers).forward_causal(tokens)
    torch.testing.assert_close(trained.detach(), served, atol=1e-5, rtol=0)
