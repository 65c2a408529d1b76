"""History-gradient updaters: hand-computed Adam / Nesterov momentum / SGD steps and schedules."""

import math

import pytest
import torch

from ldir_pl.sampling.history import SGD, Adam, Momentum, StepSize

ADAM = (0.9, 0.999, 1e-8, "standard")  # conf/sampler/guidance/update/adam.yaml


def test_sgd_is_plain_gradient_step():
    z, g = torch.tensor([1.0, -2.0]), torch.tensor([0.5, 4.0])
    out = SGD().update(z, g, 0.1)
    assert torch.allclose(out, torch.tensor([0.95, -2.4]))
    assert torch.equal(z, torch.tensor([1.0, -2.0]))  # not in place


def test_adam_matches_hand_computation_standard_bias_correction():
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.1
    opt = Adam(b1, b2, eps, "standard")
    grads = [torch.tensor([2.0, -1.0]), torch.tensor([1.0, 3.0]), torch.tensor([-0.5, 0.25])]
    z = torch.zeros(2)
    m = v = [0.0, 0.0]
    zh = [0.0, 0.0]
    for k, g in enumerate(grads, start=1):
        z = opt.update(z, g, lr)
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g.tolist())]
        v = [b2 * vi + (1 - b2) * gi * gi for vi, gi in zip(v, g.tolist())]
        zh = [zi - lr * (mi / (1 - b1**k)) / (math.sqrt(vi / (1 - b2**k)) + eps) for zi, mi, vi in zip(zh, m, v)]
        assert torch.allclose(z, torch.tensor(zh), atol=1e-6), (k, z, zh)
    # first standard-corrected Adam step is lr * sign(g)
    first = Adam(*ADAM).update(torch.zeros(2), torch.tensor([2.0, -1.0]), 0.1)
    assert torch.allclose(first, torch.tensor([-0.1, 0.1]), atol=1e-6)


@pytest.mark.parametrize("mode", ["constant", "none"])
def test_adam_other_bias_corrections(mode):
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.1
    opt = Adam(b1, b2, eps, mode)
    g1, g2 = torch.tensor([2.0]), torch.tensor([1.0])
    c1, c2 = (1 - b1, 1 - b2) if mode == "constant" else (1.0, 1.0)
    z = opt.update(torch.zeros(1), g1, lr)
    m, v = (1 - b1) * 2.0, (1 - b2) * 4.0
    expect = -lr * (m / c1) / (math.sqrt(v / c2) + eps)
    assert z.item() == pytest.approx(expect, rel=1e-5)
    z = opt.update(z, g2, lr)
    m, v = b1 * m + (1 - b1) * 1.0, b2 * v + (1 - b2) * 1.0
    expect += -lr * (m / c1) / (math.sqrt(v / c2) + eps)
    assert z.item() == pytest.approx(expect, rel=1e-5)


def test_nesterov_momentum_matches_hand_computation():
    mu, lr = 0.9, 0.5
    opt = Momentum(mu, nesterov=True)
    grads = [1.0, 2.0, -1.0]
    z, zh, buf = torch.zeros(1), 0.0, None
    for g in grads:
        z = opt.update(z, torch.tensor([g]), lr)
        buf = g if buf is None else mu * buf + g
        zh -= lr * (g + mu * buf)
        assert z.item() == pytest.approx(zh, rel=1e-6)


def test_reset_and_per_image_lr():
    opt = Adam(*ADAM)
    z = torch.zeros(2, 1, 2, 2)
    g = torch.ones_like(z)
    out = opt.update(z, g, torch.tensor([0.1, 0.2]))
    assert torch.allclose(out[0], torch.full((1, 2, 2), -0.1), atol=1e-6)
    assert torch.allclose(out[1], torch.full((1, 2, 2), -0.2), atol=1e-6)
    opt.reset()
    assert opt.m is None and opt.k == 0


def test_step_sizes_and_validation():
    with pytest.raises(ValueError, match="bias_correction"):
        Adam(0.9, 0.999, 1e-8, "weird")
    assert StepSize(0.3, "constant", 0.0)(5, 10) == 0.3
    assert StepSize(1.0, "linear", 0.0)(0, 11) == 1.0
    assert StepSize(1.0, "linear", 0.0)(10, 11) == pytest.approx(0.0)
    assert StepSize(1.0, "linear", 0.5)(5, 11) == pytest.approx(0.75)
    assert StepSize(1.0, "cosine", 0.2)(10, 11) == pytest.approx(0.2)
    assert StepSize(2.0, "sqrt_one_minus_alpha_bar", 0.0)(0, 5, alpha_bar=0.75) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="schedule='exp'"):
        StepSize(1.0, "exp", 0.0)
