"""DFlash training objective: many drafted blocks per sequence in one pass, each seeing what vLLM would give
it.

Anchors: position a of a row is an anchor when a is not its document's first token and x_{a+1} is in the same
document and loss-masked (the block's first drafted token is trained).  Up to `num_anchors` anchors per row
are drawn without replacement, from a generator seeded by the batch's content (so an exact resume redraws
them).

Block at anchor a (block size S): ids [x_a, MASK, ..., MASK] at positions pos[a], pos[a] + 1, ...,
pos[a] + S - 1.  Its queries see the context keys of positions t < a of a's document (exactly the verified
prefix when x_a is the bonus token) and every key of their own block, nothing else.  Block position j >= 1
predicts x_{a+j}: the teacher is the target's distribution at a + j - 1 (teacher_logits, already over the
draft vocabulary), valid when a + j is in a's document and loss-masked.

loss_j = mean over valid blocks of the soft cross-entropy against softmax(teacher); loss = sum_j w_j loss_j /
sum_j w_j with w_j = exp(-(j - 1) / loss_decay) (the later positions only count when the earlier ones are
accepted); loss_decay = 0 gives equal weights.  Accuracy j compares the draft's argmax (as a target id) with
the target's argmax at a + j - 1.  The output has the TTT objective's fields, one "step" per drafted position.
"""
from __future__ import annotations

import hashlib
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from models.draft.ttt import TTTOutput


def valid_anchors(loss_mask: Tensor, document_ids: Tensor) -> Tensor:
    """(B, L) bool: a has context in its document and x_{a+1} is in it and loss-masked."""
    valid = torch.zeros_like(document_ids, dtype=torch.bool)
    here = document_ids[:, 1:-1]
    valid[:, 1:-1] = (here >= 0) & (here == document_ids[:, :-2]) & (here == document_ids[:, 2:]) \
        & loss_mask[:, 2:].bool()
    return valid


def batch_generator(input_ids: Tensor) -> torch.Generator:
    """A CPU generator seeded by the batch's token ids: the same batch always draws the same anchors."""
    digest = hashlib.sha256(input_ids.detach().cpu().numpy().tobytes()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def sample_anchors(valid: Tensor, num_anchors: int, generator: torch.Generator) -> Tuple[Tensor, Tensor]:
    """(anchors (B, N), keep (B, N)): up to num_anchors valid positions per row, ascending; N = the largest
    count drawn in any row (at least 1); rows with fewer fill with position 0 and keep=False."""
    scores = torch.rand(valid.shape, generator=generator).to(valid.device)
    scores = torch.where(valid, scores, torch.full_like(scores, 2.0))  # valid first, in random order
    counts = valid.sum(1).clamp(max=num_anchors)
    num = max(int(counts.max()), 1)
    picked = scores.argsort(1)[:, :num]
    keep = torch.arange(num, device=valid.device)[None] < counts[:, None]
    anchors = torch.where(keep, picked, torch.zeros_like(picked))
    order = torch.where(keep, anchors, torch.full_like(anchors, valid.shape[1])).argsort(1)
    return anchors.gather(1, order), keep.gather(1, order)


def block_layout(anchors: Tensor, position_ids: Tensor, document_ids: Tensor, block_size: int):
    """(block positions (B, N*S), visibility (B, N*S, L + N*S)) of the blocks at `anchors` (B, N)."""
    batch, num = anchors.shape
    length = document_ids.shape[1]
    offsets = torch.arange(block_size, device=anchors.device)
    positions = (position_ids.gather(1, anchors)[..., None] + offsets).reshape(batch, num * block_size)
    anchor_docs = document_ids.gather(1, anchors).repeat_interleave(block_size, 1)  # (B, Q)
    anchor_at = anchors.repeat_interleave(block_size, 1)
    keys = torch.arange(length, device=anchors.device)
    context = (document_ids[:, None, :] == anchor_docs[..., None]) & (keys[None, None] < anchor_at[..., None])
    block_of = torch.arange(num * block_size, device=anchors.device) // block_size
    own = (block_of[:, None] == block_of[None, :]).expand(batch, -1, -1)
    return positions, torch.cat([context, own], 2)


def block_hidden(draft, input_ids: Tensor, aux_hidden_states: Tensor, position_ids: Tensor,
                 document_ids: Tensor, anchors: Tensor) -> Tensor:
    """Out states (B, N, S - 1, H), before the final norm, of the drafted positions of the blocks at
    anchors."""
    block_size = draft.config.block_size
    batch, num = anchors.shape
    positions, visible = block_layout(anchors, position_ids, document_ids, block_size)
    ids = torch.full((batch, num * block_size), draft.config.mask_token_id, device=input_ids.device)
    ids[:, ::block_size] = input_ids.gather(1, anchors)
    is_mask = (torch.arange(num * block_size, device=ids.device) % block_size != 0)[None].expand_as(ids)
    hidden = draft.forward_blocks(draft.context_states(aux_hidden_states), position_ids,
                                  draft.embed_block(ids, is_mask), positions, visible)
    return hidden.view(batch, num, block_size, -1)[:, :, 1:]


def dflash_forward(draft, input_ids: Tensor, aux_hidden_states: Tensor, teacher_logits: Tensor,
                   teacher_argmax: Tensor, loss_mask: Tensor, position_ids: Tensor, document_ids: Tensor,
                   num_anchors: int = 64, loss_decay: float = 7.0, anchors: Tensor = None,
                   keep: Tensor = None) -> TTTOutput:
    """The DFlash loss of a (padded or packed) batch; `anchors`/`keep` (B, N) override the sampling."""
    block_size, vd = draft.config.block_size, draft.config.draft_vocab_size
    if teacher_logits.shape[-1] != vd:
        raise ValueError(f"teacher_logits last dim {teacher_logits.shape[-1]} != draft_vocab_size {vd}")
    if position_ids.dim() != 2:
        raise ValueError("draft=dflash takes (B, L) position ids; "
                         "M-RoPE (3, B, L) positions are not supported")
    if anchors is None:
        valid = valid_anchors(loss_mask, document_ids)
        anchors, keep = sample_anchors(valid, num_anchors, batch_generator(input_ids))
    hidden = block_hidden(draft, input_ids, aux_hidden_states, position_ids, document_ids, anchors)
    length = input_ids.shape[1]
    offsets = torch.arange(1, block_size, device=anchors.device)
    labels_at = anchors[..., None] + offsets  # (B, N, S-1): the predicted token's position a + j
    inside = labels_at < length
    safe = labels_at.clamp(max=length - 1)
    doc = document_ids.gather(1, anchors)[..., None]
    target_valid = keep[..., None] & inside & (document_ids.gather(1, safe.flatten(1)).view_as(safe) == doc) \
        & loss_mask.gather(1, safe.flatten(1)).view_as(safe).bool()
    rows, blocks, steps = target_valid.nonzero(as_tuple=True)
    logits = draft.compute_logits(hidden[rows, blocks, steps])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    teacher_at = safe[rows, blocks, steps] - 1
    teacher_probs = teacher_logits[rows, teacher_at].to(logits.dtype).softmax(-1)
    per_token = F.cross_entropy(logits, teacher_probs, reduction="none")
    hits = (draft.to_target_ids(logits.argmax(-1)) == teacher_argmax[rows, teacher_at]).to(logits.dtype)
    with torch.no_grad():  # teacher-forced acceptance sum_v min(p_v, q_v) per drafted position
        accept = torch.minimum(teacher_probs, logits.softmax(-1)).sum(-1)

    num_steps = block_size - 1
    counts = torch.zeros(num_steps, dtype=logits.dtype, device=logits.device).index_add_(
        0, steps, torch.ones_like(per_token))
    loss_sums = torch.zeros_like(counts).index_add_(0, steps, per_token)
    correct = torch.zeros_like(counts).index_add_(0, steps, hits)
    accepted = torch.zeros_like(counts).index_add_(0, steps, accept)
    losses = loss_sums / counts.clamp(min=1)
    j = torch.arange(num_steps, dtype=losses.dtype, device=losses.device)
    weights = torch.exp(-j / loss_decay) if loss_decay > 0 else torch.ones_like(j)
    first = steps == 0
    num_out_of_vocab = (~draft.t2d[teacher_argmax[rows[first], teacher_at[first]]]).sum()
    return TTTOutput(loss=(weights * losses).sum() / weights.sum(), loss_per_step=losses.detach(),
                     correct_per_step=correct.detach(), count_per_step=counts.detach(),
                     num_out_of_vocab=num_out_of_vocab, accept_per_step=accepted)
