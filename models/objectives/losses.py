"""Per-position losses between a draft's logits and the target's (teacher) logits, registered in LOSSES.

Every loss takes draft logits z and teacher logits t over the same (draft) vocabulary, (N, Vd) each, plus the
objective's config (for its knobs), and returns one loss per position, (N,).  p = softmax(t) is the target's
distribution (renormalised over the draft vocabulary), q = softmax(z) the draft's.

- soft_ce:   -sum_v p_v log q_v (the distillation loss Eagle3 trainers use; same gradient as KL(p || q)).
- lk:        -log alpha with alpha = sum_v min(p_v, q_v), the probability that speculative sampling accepts
             a token drawn from q (the LK family's "alpha" loss: acceptance itself, not the whole shape of p).
- lk_hybrid: lam * KL(p || q) + (1 - lam) * (1 - alpha) with lam = exp(-eta * sg[alpha]): KL's dense gradient
             while acceptance is low, the acceptance objective as it grows (sg: no gradient through lam).

`top1_agreement` (-log q of the teacher's argmax) is the extra term for greedy verification, where a draft
token is accepted exactly when it is the target's argmax.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from models.registry import LOSSES

MIN_ACCEPTANCE = 1e-6  # floor of alpha inside -log(alpha): keeps the loss finite when p and q are disjoint


def acceptance(draft_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """alpha = sum_v min(p_v, q_v) per position, (N,): speculative sampling's acceptance probability."""
    return torch.minimum(teacher_logits.softmax(-1), draft_logits.softmax(-1)).sum(-1)


def kl_divergence(draft_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """KL(p || q) per position, (N,); 0 log 0 = 0."""
    log_p = teacher_logits.log_softmax(-1)
    return (log_p.exp() * (log_p - draft_logits.log_softmax(-1))).sum(-1)


@LOSSES.register("soft_ce")
def soft_cross_entropy(draft_logits: Tensor, teacher_logits: Tensor, cfg=None) -> Tensor:
    return F.cross_entropy(draft_logits, teacher_logits.softmax(-1), reduction="none")


@LOSSES.register("lk")
def lk_loss(draft_logits: Tensor, teacher_logits: Tensor, cfg=None) -> Tensor:
    return -acceptance(draft_logits, teacher_logits).clamp(min=MIN_ACCEPTANCE).log()


@LOSSES.register("lk_hybrid")
def lk_hybrid_loss(draft_logits: Tensor, teacher_logits: Tensor, cfg) -> Tensor:
    alpha = acceptance(draft_logits, teacher_logits)
    weight = torch.exp(-cfg.hybrid_eta * alpha.detach())
    return weight * kl_divergence(draft_logits, teacher_logits) + (1 - weight) * (1 - alpha)


def top1_agreement(draft_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """-log q(argmax p) per position, (N,)."""
    return F.cross_entropy(draft_logits, teacher_logits.argmax(-1), reduction="none")
