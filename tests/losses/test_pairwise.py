"""The pairwise model's loss: the mean binary cross-entropy of the two presentation
orders, equal to the plain BCE computation and stable for large logits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from starpo.losses.pairwise import pairwise_bce


def test_pairwise_bce_is_the_mean_bce_of_both_orders():
    zc = torch.tensor([2.0, 0.0, -1.5, 0.3])
    zr = torch.tensor([-1.0, 0.0, 2.5, 0.7])
    got = pairwise_bce(zc, zr)
    plain = 0.5 * (F.binary_cross_entropy(torch.sigmoid(zc), torch.ones(4), reduction="none")
                   + F.binary_cross_entropy(torch.sigmoid(zr), torch.zeros(4),
                                            reduction="none"))
    assert torch.allclose(got, plain, atol=1e-6)
    by_hand = [0.5 * (-math.log(1 / (1 + math.exp(-a))) - math.log(1 - 1 / (1 + math.exp(-b))))
               for a, b in zip(zc.tolist(), zr.tolist())]
    assert got.tolist() == pytest.approx(by_hand, rel=1e-6)
    assert got[1].item() == pytest.approx(math.log(2))        # "½ to everything"


def test_pairwise_bce_is_stable_in_the_tails_and_has_gradients():
    zc = torch.tensor([-40.0, 40.0], requires_grad=True)
    zr = torch.tensor([40.0, -40.0], requires_grad=True)
    got = pairwise_bce(zc, zr)
    assert got[0].item() == pytest.approx(40.0, rel=1e-5)     # both orders wrong by 40
    assert got[1].item() == pytest.approx(0.0, abs=1e-12)
    got.sum().backward()
    assert zc.grad.tolist() == pytest.approx([-0.5, 0.0], abs=1e-6)
    assert zr.grad.tolist() == pytest.approx([0.5, 0.0], abs=1e-6)
