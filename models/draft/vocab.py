"""Draft vocabulary maps: draft id <-> target id (data/vocab.py builds them from token counts).

d2t[i] is the offset from draft id i to its target id (target_id = i + d2t[i]); t2d[v] says whether target id v
is in the draft vocabulary.  A draft vocabulary as large as the target's is the identity (d2t zeros, t2d all True).
"""
from __future__ import annotations

import torch
from torch import Tensor


def draft_to_target(draft_ids: Tensor, d2t: Tensor) -> Tensor:
    return draft_ids + d2t.to(draft_ids.device)[draft_ids]


def target_to_draft(target_ids: Tensor, t2d: Tensor) -> Tensor:
    """Draft id of each target id; -1 where the target id is outside the draft vocabulary."""
    t2d = t2d.to(target_ids.device)
    draft_index = torch.cumsum(t2d.long(), 0) - 1
    return torch.where(t2d[target_ids], draft_index[target_ids], torch.full_like(target_ids, -1))
