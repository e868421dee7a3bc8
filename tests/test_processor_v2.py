"""The Model Runner V2 processor (vas_server.engine.processor_v2) steers exactly like the V1 processor
(vas_server.engine.processor_v1), fast: no engine, both processors fed the same engine steps by hand.

Both are built through the public dispatcher (VASLogitsProcessor), on real value models: the
conftest "prefix" model (separate runtime: own 1-layer trunk and value cache; state heads s1, s2
and token heads t1, t2) and two shared-path models (token heads on the base's own hidden states,
read from the hidden-state tap): "u1"/"u2", copies of t1/t2 at N = 1, and "e1" at N = 2 = all
layers of the tiny base.

V1 is told its persistent batch with BatchUpdates (removed / added / moved, as vLLM's
BatchUpdateBuilder builds them: an added row fills the lowest removed index, holes are condensed
by one-way moves, swaps reorder) and reads the live prompt/output lists it was given. V2 is told
slots with `add_request` (a finished request's slot is recycled by the next `add_request`, no
removal) and each step's row order with a real `LogitsContext`; it reads the token history from
`req_states.all_token_ids` (stand-ins for vLLM's CUDA-only buffers, with the attributes the
processor reads). Every step both get the same raw logits (permuted for V2) and the same base
hidden state per request (published on each processor's tap in its own row order), and each
request's steered row must be the same in both.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from vllm import SamplingParams
from vllm.config import CompilationConfig
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext, LogitsProcRequestState

from tiny_models import token_copy
from vas_server.core.format import DEFAULT_TOP_K, TrunkSpec
from value_models.synthetic import random_value_model
from vas_server.config import VASConfig
from vas_server.params import make_extra_args
from vas_server.processor import VASLogitsProcessor
from vas_server.engine.processor_v1 import V1Processor
from vas_server.engine.processor_v2 import V2Processor

MAX_NUM_REQS = 8  # the V2 runner's request slots (= scheduler max_num_seqs) and the value-cache slots
MAX_MODEL_LEN = 256
SEPARATE_HEADS = ("s1", "s2", "t1", "t2")  # the "prefix" model: own trunk, value cache
SHARED_HEADS = ("u1", "u2", "e1")  # shared path: the base's own hidden states


@pytest.fixture(scope="module")
def models(tiny_dir, tiny_base, value_models) -> dict[str, str]:
    vm = tiny_dir / "processor_v2_value_models"
    return {
        "prefix": value_models["prefix"],  # separate runtime, N = 1: s1, s2, t1, t2
        "shared1": token_copy(value_models["prefix"], vm / "shared1", {"t1": "u1", "t2": "u2"}),  # shared, N = 1
        "shared2": str(random_value_model(vm / "shared2", tiny_base, [("e1", "token")], seed=21,
                                          trunk=TrunkSpec("base_prefix", num_layers=2), scale=3.0)),  # shared, N = 2
    }


@pytest.fixture(scope="module")
def base(tiny_base):
    """The tiny base's HF config and, as the tap's base stand-in, HF's decoder (its final norm and
    embedding are what the tap binds)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_config = AutoConfig.from_pretrained(str(tiny_base))
    inner = AutoModelForCausalLM.from_pretrained(str(tiny_base), dtype=torch.float32).model
    tap_model = SimpleNamespace(model=inner.requires_grad_(False))
    assert hf_config.num_hidden_layers == 2  # "e1" (N = 2) reads the final states, "u1"/"u2" an aux column
    return SimpleNamespace(hf_config=hf_config, tap_model=tap_model)


def _vllm_config(tiny_base, models, base, v2: bool) -> SimpleNamespace:
    """A stand-in with exactly what the processors read; a fresh object per processor, since the
    hidden-state tap is keyed by the config object."""
    return SimpleNamespace(
        additional_config=VASConfig(value_models=models, dtype="float32",
                                    max_requests=MAX_NUM_REQS).to_additional_config(),
        use_v2_model_runner=v2,
        speculative_config=None,
        parallel_config=SimpleNamespace(pipeline_parallel_size=1, tensor_parallel_size=1,
                                        enable_batch_sharded_sampling=False),
        scheduler_config=SimpleNamespace(max_num_seqs=MAX_NUM_REQS),
        model_config=SimpleNamespace(model=str(tiny_base), tokenizer=None, trust_remote_code=False,
                                     dtype=torch.float32, max_model_len=MAX_MODEL_LEN, hf_config=base.hf_config,
                                     enforce_eager=True),
        compilation_config=CompilationConfig(),
    )


def _req_states(vocab: int) -> LogitsProcRequestState:
    """vLLM's real LogitsProcRequestState over CPU stand-ins for its buffers (StagedWriteTensor,
    UvaBackedTensor need CUDA): `.gpu` the device tensor, `.np` the host array, as the runner's."""
    def uva():
        cpu = torch.zeros(MAX_NUM_REQS, dtype=torch.int32)
        return SimpleNamespace(cpu=cpu, np=cpu.numpy(), gpu=cpu)

    return LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=MAX_NUM_REQS, vocab_size=vocab,
        all_token_ids=SimpleNamespace(gpu=torch.zeros(MAX_NUM_REQS, MAX_MODEL_LEN, dtype=torch.int32)),
        prompt_len=uva(), prefill_len=uva(),
        total_len=SimpleNamespace(gpu=torch.zeros(MAX_NUM_REQS, dtype=torch.int32)),
    )


@dataclass(eq=False)  # compared by identity
class Req:
    name: str
    prompt: list[int]
    params: SamplingParams
    top_k: int | None = None  # what the request asked for (None: the default)
    restrict: bool = False
    outputs: list[int] = field(default_factory=list)  # the live list V1 was given (V1 reads it in apply)
    req_idx: int | None = None

    @property
    def steered(self) -> bool:
        return self.params.extra_args is not None

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.outputs


class V1Batch:
    """vLLM's V1 persistent batch, as BatchUpdateBuilder reports it: removals first, an added
    request fills the lowest removed index (which then is not reported as removed), remaining holes
    are condensed by one-way moves from the end, then swaps."""

    def __init__(self):
        self.rows: list[Req] = []

    def update(self, leaving: list[Req], joining: list[Req], swaps: list[tuple[int, int]]) -> BatchUpdate | None:
        holes = sorted(self.rows.index(r) for r in leaving)
        rows: list[Req | None] = list(self.rows)
        for i in holes:
            rows[i] = None
        added = []
        for r in joining:
            i = holes.pop(0) if holes else len(rows)
            if i == len(rows):
                rows.append(r)
            else:
                rows[i] = r
            added.append((i, r.params, r.prompt, r.outputs))
        removed = list(holes)
        moved = []
        while rows and rows[-1] is None:
            rows.pop()
        while None in rows:
            hole, last = rows.index(None), len(rows) - 1
            rows[hole], rows[last] = rows[last], None
            moved.append((last, hole, MoveDirectionality.UNIDIRECTIONAL))
            while rows and rows[-1] is None:
                rows.pop()
        for a, b in swaps:
            rows[a], rows[b] = rows[b], rows[a]
            moved.append((a, b, MoveDirectionality.SWAP))
        self.rows = rows
        if not (removed or added or moved):
            return None  # what vLLM passes when the batch did not change
        return BatchUpdate(batch_size=len(rows), removed=removed, added=added, moved=moved)


def _ctx(order: list[Req]) -> LogitsContext:
    """Model Runner V2's context for one logits row per request, in this order."""
    slots = np.array([r.req_idx for r in order], dtype=np.int32)
    lengths = np.array([len(r.tokens) for r in order], dtype=np.int32)  # sampled position + 1
    mapping = torch.from_numpy(slots.copy())
    return LogitsContext(
        expanded_idx_mapping=mapping.clone(), idx_mapping=mapping, idx_mapping_np=slots,
        expanded_local_pos=torch.zeros(len(order), dtype=torch.int32),
        input_ids=torch.tensor([r.tokens[-1] for r in order], dtype=torch.int32),
        pos=torch.from_numpy(lengths.astype(np.int64) - 1), seq_lens_upper_bound_np=lengths,
    )


def _build(tiny_base, models, base):
    v1 = VASLogitsProcessor(_vllm_config(tiny_base, models, base, v2=False), torch.device("cpu"), False)
    req_states = _req_states(base.hf_config.vocab_size)
    v2 = VASLogitsProcessor(_vllm_config(tiny_base, models, base, v2=True), req_states)
    assert type(v1) is V1Processor and type(v2) is V2Processor
    assert isinstance(v1, VASLogitsProcessor) and isinstance(v2, VASLogitsProcessor)  # the public class
    for proc in (v1, v2):
        tap = proc.steering.tap
        assert tap is not None and tap.depths == (1, 2) and tap.aux_layers == (1,)
        assert set(proc.steering.runtime.head_names) == set(SEPARATE_HEADS + SHARED_HEADS)
        tap.bind(base.tap_model)
    assert v1.steering.tap is not v2.steering.tap  # one tap per engine configuration
    return v1, v2, req_states


def _request(name: str, rng: random.Random, vocab: int, heads: tuple[str, ...] | None,
             top_k: int | None = None, restrict: bool = False) -> Req:
    prompt = [rng.randrange(vocab) for _ in range(rng.randint(3, 20))]
    if heads is None:
        return Req(name, prompt, SamplingParams())
    weights = {h: rng.uniform(-3, 3) for h in heads}
    extra = make_extra_args(weights, top_k=top_k, restrict_to_top_k=restrict)
    return Req(name, prompt, SamplingParams(extra_args=extra), top_k, restrict)


# Engine steps: (requests that left before the step, requests that join, V1 swaps). A finished
# request's V2 slot goes to the next joining one; "D" is preempted at step 3 (removed in V1, just
# absent in V2) and resumed with its outputs at step 4, in a different V2 slot.
SCHEDULE = [
    ([], ["A", "B", "C", "D", "E"], []),
    ([], [], [(0, 3), (1, 4)]),
    (["A", "B"], ["F", "G"], []),  # steered A's slot (with a value-cache slot) -> F; plain B's -> G
    (["E", "D"], ["H"], []),  # steered E's slot -> plain H; D preempted; the other hole condensed
    ([], ["D"], [(0, 2)]),  # D resumed
    (["C", "H"], [], []),  # only steered rows remain: the every-row path
    ([], [], []),  # unchanged batch: V1 gets None
    ([], [], []),
]
# Steps whose V2 slot order (ctx.idx_mapping_np) is the step before's: at step 2 the recycled slots
# keep their positions (only add_request tells the processor that the occupants changed); at step
# 6 nothing changed (the processor may reuse its batch, but must take this step's lengths).
SAME_SLOT_ORDER = {2, 6}


@pytest.mark.parametrize("seed", [0, 1])
def test_v2_processor_steers_exactly_like_v1(tiny_base, models, base, seed):
    v1, v2, req_states = _build(tiny_base, models, base)
    vocab = base.hf_config.vocab_size
    width = base.hf_config.hidden_size * (1 + len(v1.steering.tap.aux_layers))
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    reqs = {
        "A": _request("A", rng, vocab, ("s1", "t1", "u1", "e1"), top_k=256),  # both runtimes, K = 256
        "B": _request("B", rng, vocab, None),
        "C": _request("C", rng, vocab, ("s2", "u2"), top_k=5, restrict=True),
        "D": _request("D", rng, vocab, ("t2", "e1")),  # default top-K
        "E": _request("E", rng, vocab, ("u1", "e1"), top_k=256, restrict=True),  # shared only: no cache slot
        "F": _request("F", rng, vocab, ("s1", "s2", "t1", "t2", "u2"), top_k=5),
        "G": _request("G", rng, vocab, ("t1", "u1", "e1"), top_k=5, restrict=True),
        "H": _request("H", rng, vocab, None),
    }
    batch = V1Batch()
    live: list[Req] = []
    free_req_indices = list(range(MAX_NUM_REQS))
    all_tokens = req_states.all_token_ids.gpu
    order: list[Req] = []
    slot_order: list[int] = []
    checked_steered = checked_plain = 0

    for step, (leaving, joining, swaps) in enumerate(SCHEDULE):
        leaving, joining = [reqs[n] for n in leaving], [reqs[n] for n in joining]
        # V2: a request that leaves gives its slot back (nothing is told to the processor); a joining
        # one takes the lowest free slot, its tokens are written first, then add_request.
        for r in leaving:
            free_req_indices.append(r.req_idx)
            r.req_idx = None
        free_req_indices.sort()
        for r in joining:
            if r.name == "D":  # resumed, in another slot than before (H took D's old one, still holding D's row)
                free_req_indices.remove(5)
                r.req_idx = 5
            else:
                r.req_idx = free_req_indices.pop(0)
            s, tokens = r.req_idx, r.tokens
            all_tokens[s, :len(tokens)] = torch.tensor(tokens, dtype=torch.int32)
            req_states.prompt_len.np[s] = len(r.prompt)
            req_states.prefill_len.np[s] = len(tokens)
            req_states.total_len.gpu[s] = len(tokens)
            assert v2.add_request(s, r.params) is r.steered
        v2.apply_staged_writes()
        # V1: the BatchUpdate of the same changes.
        v1.update_state(batch.update(leaving, joining, swaps))
        live = [r for r in live if r not in leaving] + joining
        assert sorted(r.name for r in batch.rows) == sorted(r.name for r in live)

        # V2's rows: a new order every step, different from the step before's and from V1's, except
        # in SAME_SLOT_ORDER steps.
        if step in SAME_SLOT_ORDER:
            occupant = {r.req_idx: r for r in live}
            order = [occupant[s] for s in slot_order]
        else:
            previous = order
            while order == previous or order == batch.rows:
                order = rng.sample(live, len(live))
        assert (step in SAME_SLOT_ORDER) == (slot_order == [r.req_idx for r in order])
        slot_order = [r.req_idx for r in order]

        raw = {r.name: torch.randn(vocab, generator=gen) * 3 for r in live}
        hidden = {r.name: torch.randn(width, generator=gen) for r in live}
        v1.steering.tap.publish(torch.stack([hidden[r.name] for r in batch.rows]))
        v2.steering.tap.publish(torch.stack([hidden[r.name] for r in order]))
        out1 = v1.apply(torch.stack([raw[r.name] for r in batch.rows]))
        out2 = v2.apply(torch.stack([raw[r.name] for r in order]), _ctx(order))

        for i, r in enumerate(batch.rows):
            got1, got2, before = out1[i], out2[order.index(r)], raw[r.name]
            # Float32 rounding of the batched trunk in two row orders: measured up to 7.6e-6 here; a
            # wrong row or token differs by whole logits.
            torch.testing.assert_close(got2, got1, atol=1e-4, rtol=1e-5,
                                       msg=lambda m: f"step {step}, request {r.name}: {m}")
            if not r.steered:
                assert torch.equal(got1, before) and torch.equal(got2, before), (step, r.name)
                checked_plain += 1
                continue
            k = min(r.top_k or DEFAULT_TOP_K, vocab)
            candidates = torch.zeros(vocab, dtype=torch.bool)
            candidates[before.topk(k).indices] = True
            changed = got1 != before
            assert changed[candidates].sum() >= k - 1, (step, r.name)  # the steering moved (nearly) every candidate
            assert torch.isfinite(got1[candidates]).all()
            if r.restrict:
                assert torch.isneginf(got1[~candidates]).all(), (step, r.name)
            else:
                assert not changed[~candidates].any(), (step, r.name)
            checked_steered += 1

        assert v1.stats()["steps"] == v2.stats()["steps"] == step + 1
        live_req_indices = {r.req_idx for r in live}  # what the worker extension reads from V2's runner
        assert v1.stats()["active_requests"] == v2.stats(live_req_indices)["active_requests"] == sum(r.steered for r in live)
        assert v1.stats()["cache_slots_used"] == v2.stats(live_req_indices)["cache_slots_used"]
        # Sample (greedy on V1's steered row) and commit: V1 reads its live lists, V2 its buffer.
        for i, r in enumerate(batch.rows):
            token = int(out1[i].argmax())
            all_tokens[r.req_idx, len(r.tokens)] = token
            req_states.total_len.gpu[r.req_idx] += 1
            r.outputs.append(token)

    assert (checked_plain, checked_steered) == (4, 29)  # B at steps 0-1, H at 3-4; steered rows of all steps
    assert v1.stats()["resumed_requests"] == v2.stats()["resumed_requests"] == 1
    assert v1.stats()["vas_requests_total"] == v2.stats()["vas_requests_total"] == 7  # 6 steered + D again


@pytest.mark.parametrize("change, reason", [
    ({"speculative_config": object()}, "speculative decoding"),
    ({"enable_batch_sharded_sampling": True}, "batch-sharded sampling"),
])
def test_the_tap_refuses_what_it_cannot_serve(tiny_base, models, base, change, reason):
    """Settings under which the shared path's rows would not be this rank's logits rows, or its
    embedding not the whole vocabulary: refused when the engine starts, naming the setting."""
    from vas_server.engine.hidden_states import HiddenStateTap

    config = _vllm_config(tiny_base, models, base, v2=False)
    for key, value in change.items():
        setattr(config if key == "speculative_config" else config.parallel_config, key, value)
    with pytest.raises(ValueError, match=f"the shared-trunk value path does not support {reason}"):
        HiddenStateTap.for_config(config)
    separate_only = _vllm_config(tiny_base, {"prefix": models["prefix"]}, base, v2=False)
    for key, value in change.items():
        setattr(separate_only if key == "speculative_config" else separate_only.parallel_config, key, value)
    assert not HiddenStateTap.for_config(separate_only).active  # no shared-path model: nothing to refuse


@pytest.mark.parametrize("change", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_the_tap_takes_tensor_and_pipeline_parallelism(tiny_base, models, base, change):
    """TP and PP are served on the shared path (tests/test_parallel.py runs TP = 2); under
    TP the tap knows that its embedding is this rank's vocabulary shard."""
    from vas_server.engine.hidden_states import HiddenStateTap

    config = _vllm_config(tiny_base, models, base, v2=False)
    for key, value in change.items():
        setattr(config.parallel_config, key, value)
    tap = HiddenStateTap.for_config(config)
    assert tap.active and tap.tensor_parallel == ("tensor_parallel_size" in change)


def test_v2_metrics_count_only_live_requests(tiny_base, models, base):
    """Model Runner V2 never tells a processor that a request finished (its interface has no
    removal): /metrics' active requests and value-cache slots follow the runner's occupied
    request slots (RequestState.index_to_req_id, read by the worker extension)."""
    from vas_server.processor import VASWorkerExtension

    _, v2, _ = _build(tiny_base, models, base)
    rng = random.Random(5)
    vocab = base.hf_config.vocab_size
    reqs = [_request("A", rng, vocab, ("s1", "u1")),  # separate trunk: a value-cache slot
            _request("B", rng, vocab, ("u2",)),  # shared path only: no slot
            _request("C", rng, vocab, None)]  # plain
    occupied = {}
    worker = VASWorkerExtension()
    worker.model_runner = SimpleNamespace(sampler=SimpleNamespace(logits_processors=[v2]),
                                          req_states=SimpleNamespace(index_to_req_id=occupied))
    for slot, req in enumerate(reqs):
        occupied[slot] = req.name
        v2.add_request(slot, req.params)

    def counts():
        stats = worker.vas_stats()
        return stats["active_requests"], stats["cache_slots_used"], stats["vas_requests_total"]

    assert counts() == (2, 1, 2)
    del occupied[0]  # A finished: vLLM's RequestState.remove_request
    assert counts() == (1, 0, 2)
    occupied.clear()  # idle
    assert counts() == (0, 0, 2)
    occupied[0] = "D"  # A's slot recycled for a plain request: add_request drops A's row
    v2.add_request(0, SamplingParams())
    assert counts() == (0, 0, 2) and v2.steering.runtime.cache_slots_in_use == 0
