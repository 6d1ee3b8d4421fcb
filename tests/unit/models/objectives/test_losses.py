"""Each registered loss against a naive per-element reference written here: values and gradients (float64)."""
import math
from types import SimpleNamespace

import pytest
import torch

from models.objectives.losses import acceptance, kl_divergence, top1_agreement
from models.registry import LOSSES

CFG = SimpleNamespace(hybrid_eta=3.0)


def _softmax(row):
    peak = max(row)
    exps = [math.exp(x - peak) for x in row]
    return [e / sum(exps) for e in exps]


def naive(name, z, t, weights_at=None):
    """Loops over positions and vocabulary with plain floats; returns a list of per-position losses.

    lk_hybrid's KL weight is computed at `weights_at` (default z): held fixed, as sg[] holds it."""
    out = []
    weight_logits = (z if weights_at is None else weights_at).tolist()
    for zr, tr, wr in zip(z.tolist(), t.tolist(), weight_logits):
        p, q = _softmax(tr), _softmax(zr)
        alpha = sum(min(a, b) for a, b in zip(p, q))
        kl = sum(a * (math.log(a) - math.log(b)) for a, b in zip(p, q) if a > 0)
        if name == "soft_ce":
            out.append(-sum(a * math.log(b) for a, b in zip(p, q)))
        elif name == "lk":
            out.append(-math.log(alpha))
        elif name == "lk_hybrid":
            weight = math.exp(-CFG.hybrid_eta * sum(min(a, b) for a, b in zip(p, _softmax(wr))))
            out.append(weight * kl + (1 - weight) * (1 - alpha))
        elif name == "top1":
            out.append(-math.log(q[max(range(len(p)), key=p.__getitem__)]))
    return out


def logits(seed, n=5, v=7):
    g = torch.Generator().manual_seed(seed)
    return 2 * torch.randn(n, v, generator=g, dtype=torch.float64)


def numeric_grad(fn, z, eps=1e-6):
    grad = torch.zeros_like(z)
    for index in range(z.numel()):
        bump = torch.zeros_like(z).view(-1)
        bump[index] = eps
        bump = bump.view_as(z)
        grad.view(-1)[index] = (float(sum(fn(z + bump))) - float(sum(fn(z - bump)))) / (2 * eps)
    return grad


FUNCTIONS = {"soft_ce": LOSSES.get("soft_ce"), "lk": LOSSES.get("lk"), "lk_hybrid": LOSSES.get("lk_hybrid"),
             "top1": lambda z, t, cfg: top1_agreement(z, t)}


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_loss_value_and_gradient_match_naive(name):
    z, t = logits(0).requires_grad_(True), logits(1)
    loss = FUNCTIONS[name](z, t, CFG)
    torch.testing.assert_close(loss, torch.tensor(naive(name, z.detach(), t), dtype=torch.float64),
                               rtol=1e-10, atol=1e-12)
    (grad,) = torch.autograd.grad(loss.sum(), z)
    expected = numeric_grad(lambda x: naive(name, x, t, z.detach()), z.detach())
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


def test_lk_hybrid_weight_takes_no_gradient():
    """lam = exp(-eta * sg[alpha]): the gradient is lam * dKL - (1 - lam) * dalpha with lam held fixed."""
    z, t = logits(2).requires_grad_(True), logits(3)
    (grad,) = torch.autograd.grad(LOSSES.get("lk_hybrid")(z, t, CFG).sum(), z)
    weight = torch.exp(-CFG.hybrid_eta * acceptance(z, t)).detach()[:, None]
    (d_kl,) = torch.autograd.grad(kl_divergence(z, t).sum(), z)
    (d_alpha,) = torch.autograd.grad(acceptance(z, t).sum(), z)
    torch.testing.assert_close(grad, weight * d_kl - (1 - weight) * d_alpha)


def test_perfect_draft_scores_full_acceptance_and_zero_losses():
    t = logits(4)
    torch.testing.assert_close(acceptance(t, t), torch.ones(5, dtype=torch.float64))
    for name in ("lk", "lk_hybrid"):
        torch.testing.assert_close(LOSSES.get(name)(t, t, CFG), torch.zeros(5, dtype=torch.float64))
    # soft CE of a perfect draft is the teacher's entropy: the KL part is zero
    torch.testing.assert_close(kl_divergence(t, t), torch.zeros(5, dtype=torch.float64))


def test_lk_stays_finite_on_disjoint_distributions():
    z = torch.tensor([[60.0, -60.0]], dtype=torch.float64, requires_grad=True)
    t = torch.tensor([[-60.0, 60.0]], dtype=torch.float64)
    loss = LOSSES.get("lk")(z, t)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(z.grad).all()
