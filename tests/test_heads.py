"""Token heads' state baseline: it carries V(s) in training and never changes centred values."""

import torch

from vas_server.core.format import HeadSpec
from vas_server.core.heads import ValueHeads

H, V = 8, 50


def random_heads(seed: int) -> ValueHeads:
    heads = ValueHeads([HeadSpec("a", "token", "a"), HeadSpec("b", "token", "b")], H, V)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return heads


def test_baseline_shifts_every_candidate_of_a_row_by_u_dot_h():
    heads = random_heads(0)
    hidden, embed = torch.randn(3, H), torch.randn(V, H)
    candidates = torch.randint(0, V, (3, 5))
    with_baseline = heads.token(hidden, embed, candidates)
    baseline = (hidden @ heads.token.baseline.T).T  # [n_token, B]
    with torch.no_grad():
        heads.token.baseline.zero_()
    without = heads.token(hidden, embed, candidates)
    assert baseline.abs().min() > 1e-3  # the test means something
    assert torch.allclose(with_baseline - without, baseline[:, :, None].expand_as(without), atol=1e-5)
    centred = lambda q: q - q.mean(dim=-1, keepdim=True)  # noqa: E731  (docs/VAS_RULE.md §1.3)
    assert torch.allclose(centred(with_baseline), centred(without), atol=1e-5)


def test_round_trip_and_files_without_a_baseline():
    heads = random_heads(1)
    tensors = {k: v.detach().clone() for k, v in heads.to_tensors().items()}
    again = ValueHeads.from_tensors(heads.specs, tensors, H, V)
    assert all(torch.equal(a, b) for a, b in zip(heads.parameters(), again.parameters()))
    old = {k: v for k, v in tensors.items() if not k.endswith(".baseline")}  # written before baselines existed
    loaded = ValueHeads.from_tensors(heads.specs, old, H, V)
    assert torch.equal(loaded.token.baseline, torch.zeros(2, H))
    assert torch.equal(loaded.token.proj, heads.token.proj) and torch.equal(loaded.token.bias, heads.token.bias)
