"""The exact minibatch coupling and the DeepJDOT joint loss against brute force on tiny inputs."""

from __future__ import annotations

import itertools

import pytest
import torch

from lorakit.regularizers import (
    RegularizerError,
    deepjdot_loss,
    exact_coupling,
    feature_cost,
    label_cost,
)

pytest.importorskip("scipy")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _brute_force(cost: torch.Tensor) -> float:
    n = cost.shape[0]
    return min(sum(cost[i, p[i]].item() for i in range(n)) / n for p in itertools.permutations(range(n)))


@pytest.mark.parametrize("seed", range(5))
def test_square_coupling_is_the_best_permutation(seed):
    cost = torch.rand(6, 6, generator=_gen(seed), dtype=torch.float64)
    plan = exact_coupling(cost)
    assert set(plan.unique().tolist()) <= {0.0, 1 / 6}
    torch.testing.assert_close(plan.sum(0), torch.full((6,), 1 / 6, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(1), torch.full((6,), 1 / 6, dtype=torch.float64))
    assert (plan * cost).sum().item() == pytest.approx(_brute_force(cost), rel=1e-12)


def test_unequal_coupling_has_uniform_marginals_and_beats_permutation_lifts():
    cost = torch.rand(3, 6, generator=_gen(1), dtype=torch.float64)
    plan = exact_coupling(cost)
    torch.testing.assert_close(plan.sum(1), torch.full((3,), 1 / 3, dtype=torch.float64))
    torch.testing.assert_close(plan.sum(0), torch.full((6,), 1 / 6, dtype=torch.float64))
    # Splitting each row into two copies turns the 3×6 problem into a 6×6 assignment with the same optimum.
    assert (plan * cost).sum().item() == pytest.approx(_brute_force(cost.repeat_interleave(2, 0)), rel=1e-9)


def test_deepjdot_loss_matches_brute_force_and_has_gradients():
    xs = torch.randn(5, 3, generator=_gen(0), requires_grad=True)
    xt = torch.randn(5, 3, generator=_gen(1), requires_grad=True)
    ys = torch.tensor([0, 1, 2, 1, 0])
    logits = torch.randn(5, 3, generator=_gen(2), requires_grad=True)
    loss = deepjdot_loss(xs, xt, ys, logits, label_weight=0.5)
    cost = (feature_cost(xs, xt) + 0.5 * label_cost(ys, logits)).detach()
    assert loss.item() == pytest.approx(_brute_force(cost), rel=1e-5)
    loss.backward()
    for t in (xs, xt, logits):
        assert torch.isfinite(t.grad).all() and t.grad.abs().sum() > 0


def test_label_cost_is_cross_entropy():
    ys = torch.tensor([2, 0])
    logits = torch.randn(3, 4, generator=_gen(3))
    c = label_cost(ys, logits)
    assert c.shape == (2, 3)
    ref = torch.nn.functional.cross_entropy(logits[1:2], ys[:1])
    assert c[0, 1].item() == pytest.approx(ref.item(), rel=1e-6)


def test_feature_part_is_exact_w2_sq():
    xs, xt = torch.randn(6, 2, generator=_gen(4)), torch.randn(6, 2, generator=_gen(5))
    loss = deepjdot_loss(xs, xt, torch.zeros(6, dtype=torch.long), torch.zeros(6, 2), label_weight=0.0)
    assert loss.item() == pytest.approx(_brute_force(torch.cdist(xs, xt).pow(2)), rel=1e-5)


def test_bad_inputs_are_named():
    with pytest.raises(RegularizerError, match="NaN"):
        exact_coupling(torch.tensor([[0.0, float("nan")], [1.0, 0.0]]))
    with pytest.raises(RegularizerError, match="source_labels"):
        deepjdot_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.zeros(2, dtype=torch.long), torch.zeros(3, 2))
