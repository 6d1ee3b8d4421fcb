"""Store samples as training batches: collated like the tokenised data, and the teacher rebuilt from what
the store kept (the last hidden state, or the top-k log-probs plus tail samples)."""
from __future__ import annotations

from typing import Dict, List

import torch


def teacher_from_store_batch(batch: Dict[str, torch.Tensor], teacher_head, draft_token_ids: torch.Tensor):
    """Teacher (logits over the draft vocab, target argmax) from a store batch.

    Full layout: the stored last hidden state through the target's final norm + lm_head.  Compact layout: the
    stored top-k probabilities plus (1 - their sum) / n for each of the n stored tail samples (an unbiased
    estimate of the teacher distribution), restricted to the draft vocab, whose softmax renormalises over it
    as it does the full teacher; ids never stored get a logit far below.  Version 1 stores have no tail
    samples: the softmax then renormalises over the top-k alone.
    """
    if "last_hidden_state" in batch:
        return teacher_head.teacher_from_hidden(batch["last_hidden_state"], draft_token_ids)
    ids, probs = batch["teacher_topk_ids"], batch["teacher_topk_logprobs"].float().exp()
    device, vocab = ids.device, draft_token_ids.numel()
    tail_ids = batch.get("teacher_tail_ids")
    if tail_ids is not None and tail_ids.shape[-1] > 0:
        tail = (1.0 - probs.sum(-1, keepdim=True)).clamp(min=0.0) / tail_ids.shape[-1]
        ids, probs = torch.cat([ids, tail_ids], -1), torch.cat([probs, tail.expand(tail_ids.shape)], -1)
    # target id -> draft index; ids outside the draft vocab land in an extra column that is dropped
    lookup = torch.full((int(max(draft_token_ids.max(), ids.max())) + 1,), vocab, dtype=torch.long,
                        device=device)
    lookup[draft_token_ids.to(device)] = torch.arange(vocab, device=device)
    mass = torch.zeros((*ids.shape[:-1], vocab + 1), dtype=torch.float32, device=device)
    mass.scatter_add_(-1, lookup[ids], probs)
    mass = mass[..., :vocab]
    logits = torch.where(mass > 0, mass.clamp(min=1e-30).log(), torch.full_like(mass, -1e4))
    return logits, batch["teacher_argmax"]


STORE_FLOAT_KEYS = ("aux_hidden_states", "last_hidden_state", "teacher_topk_logprobs")
STORE_INT_KEYS = ("teacher_topk_ids", "teacher_argmax", "teacher_tail_ids")


def collate_store(samples: List[dict], packed: bool, max_tokens: int) -> dict:
    """Store samples -> the contract batch plus their per-token tensors laid out the same way."""
    from data.batching import collate

    batch = collate(samples, packed=packed, max_tokens=max_tokens)
    rows, length = batch["input_ids"].shape
    for key in STORE_FLOAT_KEYS + STORE_INT_KEYS:
        if key not in samples[0]:
            continue
        first = samples[0][key]
        out = torch.zeros((rows, length, *first.shape[1:]), dtype=first.dtype)
        for row in range(rows):
            for doc in batch["document_ids"][row].unique().tolist():
                if doc < 0:
                    continue
                where = (batch["document_ids"][row] == doc).nonzero().squeeze(-1)
                sample = samples[doc if packed else row]
                out[row, where] = sample[key][: where.numel()]
        batch[key] = out
    return batch
