"""TD(λ) targets (docs/VAS_RULE.md §2) against hand-worked numbers."""

import pytest
import torch

from value_models.td import td_lambda_returns


def test_hand_worked_example():
    # v = [0.5, 0.2, 0.8], reward 1 at the last step, λ = 0.5, γ = 1:
    #   delta_2 = 1 + 0 - 0.8 = 0.2      A_2 = 0.2                 G_2 = 1.0
    #   delta_1 = 0 + 0.8 - 0.2 = 0.6    A_1 = 0.6 + 0.5*0.2 = 0.7  G_1 = 0.9
    #   delta_0 = 0 + 0.2 - 0.5 = -0.3   A_0 = -0.3 + 0.5*0.7 = 0.05 G_0 = 0.55
    # (equivalently G_i = (1-λ) v_{i+1} + λ G_{i+1}: 0.5*0.8 + 0.5*1 = 0.9, 0.5*0.2 + 0.5*0.9 = 0.55)
    g = td_lambda_returns(torch.tensor([[0.5, 0.2, 0.8]]), torch.tensor([1.0]), torch.tensor([3]), lam=0.5)
    assert torch.allclose(g, torch.tensor([[0.55, 0.9, 1.0]]))


def test_default_lambda_and_padding():
    # λ = 0.95 (the default), v = [1, 3], reward -2:
    #   G_1 = -2 (last step: reward, value after the end is 0)
    #   G_0 = (1-λ) v_1 + λ G_1 = 0.05*3 + 0.95*(-2) = -1.75
    values = torch.tensor([[1.0, 3.0, 7.0, 7.0], [0.5, 0.2, 0.8, 9.0]])
    g = td_lambda_returns(values, torch.tensor([-2.0, 1.0]), torch.tensor([2, 3]))
    assert torch.allclose(g[0], torch.tensor([-1.75, -2.0, 0.0, 0.0]))
    # The second row's padding (9.0) must not leak into its returns.
    expected_1 = td_lambda_returns(values[1:, :3], torch.tensor([1.0]), torch.tensor([3]))
    assert torch.allclose(g[1, :3], expected_1[0])
    assert g[1, 3] == 0


@pytest.mark.parametrize("lam", [0.0, 1.0])
def test_lambda_limits(lam):
    values = torch.tensor([[0.3, -0.4, 0.9, 0.1]])
    g = td_lambda_returns(values, torch.tensor([2.0]), torch.tensor([4]), lam=lam)
    if lam == 1.0:  # Monte Carlo: the reward at every state
        assert torch.allclose(g, torch.full((1, 4), 2.0))
    else:  # one-step: the next state's value, the reward at the end
        assert torch.allclose(g, torch.tensor([[-0.4, 0.9, 0.1, 2.0]]))


def test_no_gradient_through_targets():
    values = torch.tensor([[0.5, 0.2]], requires_grad=True)
    assert not td_lambda_returns(values, torch.tensor([1.0]), torch.tensor([2])).requires_grad
