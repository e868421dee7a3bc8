"""TD(λ) targets (docs/VAS_RULE.md §2) against hand-worked numbers."""

import pytest
import torch

from value_models.td import td_lambda_returns, value_loss


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


def test_value_loss_without_beta_is_the_spec_squared_error():
    v, g = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([1.0, -1.0, -0.5])
    assert torch.equal(value_loss(v, g), 0.5 * (g - v) ** 2)
    # The soft loss tends to it as beta -> 0 (its Taylor series starts with e^2 / 2 + beta e^3 / 6).
    v, g = v.double(), g.double()
    assert torch.allclose(value_loss(v, g, 1e-5), 0.5 * (g - v) ** 2, atol=1e-4)


@pytest.mark.parametrize("beta", [2.0, -1.5])
def test_soft_value_loss_is_minimised_by_the_soft_value(beta):
    # Returns 1 and -1 with equal probability: the mean is 0, the soft value (1/beta) log cosh(beta),
    # 0.66 for beta = 2 and -0.47 for beta = -1.5 (risk-averse): far from the mean either way.
    g = torch.tensor([1.0, -1.0])
    soft = float(torch.log(torch.cosh(torch.tensor(beta))) / beta)
    v = torch.zeros((), requires_grad=True)
    optimizer = torch.optim.LBFGS([v], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = value_loss(v.expand(2), g, beta).mean()
        loss.backward()
        return loss

    optimizer.step(closure)
    assert abs(soft) > 0.4
    assert float(v) == pytest.approx(soft, abs=1e-4)
