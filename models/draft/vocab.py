"""Draft vocabulary: the most frequent target tokens, as the d2t / t2d maps vLLM and SGLang read.

d2t[i] is the offset from draft id i to its target id (target_id = i + d2t[i]); t2d[v] says whether target id v
is in the draft vocabulary.  A draft vocabulary as large as the target's is the identity (d2t zeros, t2d all True).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor


def build_draft_vocab(token_counts: Tensor, draft_vocab_size: int,
                      candidates: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The draft_vocab_size most frequent ids (ties -> lower id), ascending by target id; returns (d2t, t2d).

    candidates: the only target ids allowed in (e.g. a TTS LM's speech tokens); None allows every id."""
    if token_counts.dim() != 1:
        raise ValueError(f"token_counts must be 1-D (vocab_size,), got shape {tuple(token_counts.shape)}")
    vocab_size = token_counts.numel()
    limit = vocab_size if candidates is None else int(candidates.unique().numel())
    if not 1 <= draft_vocab_size <= limit:
        raise ValueError(f"draft_vocab_size={draft_vocab_size} must be in [1, {limit}] "
                         f"({'vocab_size' if candidates is None else 'number of candidate ids'})")
    counts = token_counts.detach().cpu().long()
    if candidates is not None:
        if int(candidates.min()) < 0 or int(candidates.max()) >= vocab_size:
            raise ValueError(f"draft vocab candidates must be target ids in [0, {vocab_size})")
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[candidates.long().cpu()] = True
        counts = torch.where(allowed, counts, torch.full_like(counts, -1))
    # stable sort on -count keeps lower ids first among equal counts
    order = torch.sort(-counts, stable=True).indices
    target_ids = order[:draft_vocab_size].sort().values
    d2t = target_ids - torch.arange(draft_vocab_size)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[target_ids] = True
    return d2t, t2d


def draft_to_target(draft_ids: Tensor, d2t: Tensor) -> Tensor:
    return draft_ids + d2t.to(draft_ids.device)[draft_ids]


def target_to_draft(target_ids: Tensor, t2d: Tensor) -> Tensor:
    """Draft id of each target id; -1 where the target id is outside the draft vocabulary."""
    t2d = t2d.to(target_ids.device)
    draft_index = torch.cumsum(t2d.long(), 0) - 1
    return torch.where(t2d[target_ids], draft_index[target_ids], torch.full_like(target_ids, -1))
