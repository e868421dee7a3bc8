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


def test_a_new_head_kind_is_one_class(monkeypatch):
    """A kind defined here and registered in KINDS (and in the format's names) is saved, loaded,
    ordered and valued with no other change: nothing else branches on a kind's name."""
    from vas_server.core import format as format_module
    from vas_server.core import heads as heads_module
    from vas_server.core.heads import KINDS, DenseEmbedding, HeadInputs, TokenHeads

    class TwiceTokenHeads(TokenHeads):  # twice a token head's value
        kind = "twice"

        def values(self, inputs):
            return 2 * super().values(inputs)

    monkeypatch.setitem(heads_module.KINDS, "twice", TwiceTokenHeads)
    monkeypatch.setattr(format_module, "HEAD_KINDS", (*format_module.HEAD_KINDS, "twice"))
    assert list(KINDS) == ["state", "token", "twice"]
    specs = [HeadSpec("d", "twice"), HeadSpec("t", "token"), HeadSpec("s", "state")]
    heads = ValueHeads(specs, H, V)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in heads.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        for tensor in TokenHeads.SAVED:  # the twice head is the token head's twin
            getattr(heads.kinds["twice"], tensor).copy_(getattr(heads.token, tensor))
    assert heads.names == ["s", "t", "d"]  # kind by kind, in KINDS order
    B, K = 3, 4
    inputs = HeadInputs(torch.randint(0, V, (B, K)), torch.randn(B, H), torch.randn(B, K, H),
                        DenseEmbedding(torch.randn(V, H)))
    values = heads.values(inputs)
    assert values.shape == (3, B, K) and values[1].abs().min() > 1e-4
    torch.testing.assert_close(values[2], 2 * values[1])
    torch.testing.assert_close(values[0], heads.state(inputs.candidate_states)[..., 0])
    tensors = {k: v.detach().clone() for k, v in heads.to_tensors().items()}
    assert {"d.proj", "d.bias", "d.baseline", "t.proj", "s.weight", "s.bias"} <= set(tensors)
    again = ValueHeads.from_tensors(specs, tensors, H, V)
    torch.testing.assert_close(again.values(inputs), values)
