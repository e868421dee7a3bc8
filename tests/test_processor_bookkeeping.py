"""The processor's batch bookkeeping, fast: fake BatchUpdates and a small fake value runtime
(no engine). The engine tests (test_vas_engine.py, test_shared_trunk.py) run the real thing.

The fake runtime values candidate token t at t for its one head, so a row steered with weight w
gets the bonus w * (t - mean of its candidates), which the tests can compute by hand.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

from vas_server.engine.heap import HeapTrimmer
from vas_server.params import make_extra_args
from vas_server.processor import VASLogitsProcessor

VOCAB = 8


class FakeRuntime:
    """The ValueRuntime interface the processor uses; `slots` cache slots, one token head "h"."""

    def __init__(self, slots: int, needs_slot: bool = True):
        self.head_names, self.head_index = ["h"], {"h": 0}
        self.max_requests = slots
        self.free_cache_slots = list(range(slots))
        self._needs_slot = needs_slot
        self.cache_bytes = 0

    @property
    def cache_slots_in_use(self) -> int:
        return self.max_requests - len(self.free_cache_slots)

    def needs_cache_slot(self, head_ids) -> bool:
        return self._needs_slot

    def allocate(self):
        return self.free_cache_slots.pop() if self.free_cache_slots else None

    def release(self, cache_slot) -> None:
        if cache_slot is not None:
            assert cache_slot not in self.free_cache_slots, "slot released twice"
            self.free_cache_slots.append(cache_slot)

    def score(self, rows, candidates, batch_rows, num_rows, new_tokens=None):
        self.last_rows = [list(r.tokens.prompt) for r in rows]
        self.last_tokens = [list(r.tokens.prompt) + list(r.tokens.outputs) for r in rows]  # what the trunk would read
        return candidates.to(torch.float32)[:, None, :]  # q(t) = t


def test_the_fake_runtime_has_the_real_runtimes_interface():
    """Every method and property FakeRuntime offers exists on ValueRuntime with the same
    parameters, and every attribute it sets is one ValueRuntime has, so that the bookkeeping
    tested here is the bookkeeping against the real interface."""
    import inspect
    import re

    from vas_server.core.value_runtime import ValueRuntime

    for name, member in vars(FakeRuntime).items():
        if name.startswith("_"):
            continue
        real = getattr(ValueRuntime, name, None)
        assert real is not None, f"ValueRuntime has no {name}"
        assert isinstance(member, property) == isinstance(real, property), name
        if callable(member):
            assert list(inspect.signature(member).parameters) == list(inspect.signature(real).parameters), name
    source = inspect.getsource(ValueRuntime)
    own = {"last_rows", "last_tokens"}  # the fake's records, for the assertions
    for name in vars(FakeRuntime(1)):
        if not name.startswith("_") and name not in own:
            assert (re.search(rf"self\.{name}\s*(:[^=\n]*)?=", source)
                    or isinstance(getattr(ValueRuntime, name, None), property)), name


def processor(slots: int = 4, needs_slot: bool = True):
    config = SimpleNamespace(additional_config={"vas": {"value_models": {}, "default_top_k": 3}},
                             use_v2_model_runner=False)
    proc = VASLogitsProcessor(config, torch.device("cpu"), False)
    proc.steering.runtime = FakeRuntime(slots, needs_slot)
    return proc


def params(weight: float | None, **vas):
    extra = make_extra_args({"h": weight}, **vas) if weight is not None else None
    return SimpleNamespace(extra_args=extra)


def update(batch_size, removed=(), added=(), moved=()):
    return BatchUpdate(batch_size=batch_size, removed=list(removed), added=list(added), moved=list(moved))


def add(index, weight, prompt=(1,), outputs=(), **vas):
    return (index, params(weight, **vas), list(prompt), list(outputs))


def logits(rows: int) -> torch.Tensor:
    """Row r: logit of token t is t / 10 + r (so the top-3 candidates are 7, 6, 5)."""
    return torch.arange(VOCAB, dtype=torch.float32)[None, :] / 10 + torch.arange(rows, dtype=torch.float32)[:, None]


def test_added_rows_get_slots_and_are_steered_by_the_rule():
    proc = processor()
    proc.update_state(update(3, added=[add(0, 2.0), add(1, None), add(2, -1.0, top_k=2)]))
    assert sorted(proc.rows) == [0, 2] and proc.steering.runtime.cache_slots_in_use == 2  # the plain row holds nothing
    before = logits(3)
    out = proc.apply(before.clone())
    assert torch.equal(out[1], before[1])  # plain rows are never touched
    # Row 0, top-3 {7, 6, 5}, mean 6, weight 2: +2, 0, -2.
    assert torch.allclose(out[0] - before[0], torch.tensor([0, 0, 0, 0, 0, -2, 0, 2.0]))
    # Row 2, top-2 {7, 6}, mean 6.5, weight -1: 7 -> -0.5, 6 -> +0.5.
    assert torch.allclose(out[2] - before[2], torch.tensor([0, 0, 0, 0, 0, 0, 0.5, -0.5]))
    assert proc.stats()["steps"] == 1 and proc.stats()["runtime_seconds_total"] > 0  # the steering time


def test_removed_rows_release_their_slot_once():
    proc = processor()
    proc.update_state(update(2, added=[add(0, 1.0), add(1, 1.0)]))
    proc.update_state(update(1, removed=[1]))
    assert list(proc.rows) == [0] and proc.steering.runtime.cache_slots_in_use == 1
    proc.update_state(update(1, removed=[1]))  # removing an empty row again changes nothing
    assert proc.steering.runtime.cache_slots_in_use == 1


def test_a_row_added_over_another_replaces_it_and_frees_its_slot():
    proc = processor()
    proc.update_state(update(1, added=[add(0, 1.0, prompt=(1,))]))
    proc.update_state(update(1, added=[add(0, 1.0, prompt=(2,))]))
    assert proc.steering.runtime.cache_slots_in_use == 1
    proc.apply(logits(1))
    assert proc.steering.runtime.last_rows == [[2]]


def test_swap_exchanges_rows_and_their_settings():
    proc = processor()
    proc.update_state(update(2, added=[add(0, 2.0, prompt=(10,)), add(1, None)]))
    proc.update_state(update(2, moved=[(0, 1, MoveDirectionality.SWAP)]))
    assert list(proc.rows) == [1] and proc.rows[1].value_row.tokens.prompt == [10]
    before = logits(2)
    out = proc.apply(before.clone())
    assert torch.equal(out[0], before[0]) and not torch.equal(out[1], before[1])


def test_one_way_move_overwrites_the_target_and_frees_its_slot():
    proc = processor()
    proc.update_state(update(3, added=[add(0, 1.0, prompt=(10,)), add(2, 1.0, prompt=(12,))]))
    proc.update_state(update(2, removed=[1], moved=[(2, 0, MoveDirectionality.UNIDIRECTIONAL)]))
    assert list(proc.rows) == [0] and proc.rows[0].value_row.tokens.prompt == [12]
    assert proc.steering.runtime.cache_slots_in_use == 1


def test_preempted_request_is_re_added_with_its_outputs():
    proc = processor()
    proc.update_state(update(1, added=[add(0, 1.0, prompt=(1, 2))]))
    proc.update_state(update(0, removed=[0]))  # preempted: removed, its slot freed
    assert proc.steering.runtime.cache_slots_in_use == 0
    proc.update_state(update(1, added=[add(0, 1.0, prompt=(1, 2), outputs=(3, 4))]))
    assert proc.steering.resumed_requests == 1 and proc.rows[0].value_row.tokens.outputs == [3, 4]
    assert proc.steering.runtime.cache_slots_in_use == 1


def test_full_cache_leaves_the_request_unsteered_instead_of_failing():
    proc = processor(slots=1)
    proc.update_state(update(2, added=[add(0, 1.0), add(1, 1.0)]))
    assert list(proc.rows) == [0] and proc.steering.dropped_requests == 1


def test_shared_path_rows_take_no_slot():
    proc = processor(slots=0, needs_slot=False)
    proc.update_state(update(2, added=[add(0, 1.0), add(1, 1.0)]))
    assert sorted(proc.rows) == [0, 1] and proc.steering.dropped_requests == 0


@pytest.mark.parametrize("extra_args", [
    {"vas": '{"weights": {"nope": 1}}'}, {"vas": "not json"}, {"vas": '{"weights": {"h": 1e39}}'},
    {"vas": '{"weights": {"h": 1}, "top_k": 0}'},
])
def test_bad_settings_that_skip_admission_run_unsteered_not_crash(extra_args):
    proc = processor()
    proc.update_state(update(1, added=[(0, SimpleNamespace(extra_args=extra_args), [1], [])]))
    assert proc.rows == {}
    before = logits(1)
    assert torch.equal(proc.apply(before.clone()), before)
    assert proc.stats()["steps"] == 0  # only steps with steered rows count


def test_restricted_rows_sample_only_their_candidates_and_logits_stay_finite():
    proc = processor()
    proc.update_state(update(1, added=[add(0, 100.0, restrict_to_top_k=True)]))
    out = proc.apply(logits(1))
    assert torch.isinf(out[0, :5]).all() and (out[0, :5] < 0).all()
    assert torch.isfinite(out[0, 5:]).all()


def test_non_finite_values_never_reach_the_sampler():
    proc = processor()
    proc.steering.runtime.score = lambda rows, candidates, *a: torch.full((len(rows), 1, candidates.shape[1]), math.nan)
    proc.update_state(update(1, added=[add(0, 100.0)]))
    out = proc.apply(logits(1))
    assert torch.isfinite(out).all()


def test_rows_without_top_k_take_the_value_models_declared_default():
    config = SimpleNamespace(additional_config={"vas": {"value_models": {}}},  # no --default-top-k
                             use_v2_model_runner=False)
    proc = VASLogitsProcessor(config, torch.device("cpu"), False)
    proc.steering.runtime = FakeRuntime(4)
    proc.steering.head_infos = {"h": SimpleNamespace(default_top_k=2)}  # as vas.json's default_top_k would say
    proc.update_state(update(2, added=[add(0, 1.0), add(1, 1.0, top_k=4)]))
    assert proc.rows[0].top_k == 2 and proc.rows[1].top_k == 4  # the request's vas_top_k wins
    before = logits(2)
    out = proc.apply(before.clone())
    assert torch.count_nonzero(out[0] - before[0]) == 2 and torch.count_nonzero(out[1] - before[1]) == 4


def test_the_processor_checks_the_heap_trimmer_every_engine_step():
    proc = processor()
    proc.steering.heap = HeapTrimmer(interval_s=0, trim=lambda pad: 1)  # interval 0: trims at every check
    for step in range(4):
        proc.update_state(update(0) if step % 2 else None)  # vLLM passes None when the batch is unchanged
    assert proc.stats()["heap_trims"] == 4


def test_async_scheduling_placeholders_are_never_read():
    """Under async scheduling a re-added row's output list ends in -1 placeholders when update_state
    runs; vLLM fills them in place just before apply. The runtime must read the filled list, so the
    processor keeps vLLM's live list instead of a copy."""
    proc = processor()
    outputs = [3, -1]
    proc.update_state(update(1, added=[(0, params(1.0), [1, 2], outputs)]))
    outputs[-1] = 7  # vLLM's update_async_output_token_ids
    proc.apply(logits(1))
    assert proc.steering.runtime.last_tokens == [[1, 2, 3, 7]]
