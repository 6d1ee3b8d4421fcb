"""Training-time test (TTT): the Eagle3 draft unrolled for k steps on its own hidden states.

Step 0 at position t reads aux_t and embed(x_{t+1}) and predicts x_{t+2} (teacher: the target at t+1).  Step i
reads step i-1's out hidden at t and embed(x_{t+1+i}) at rotary position position_ids[t] + i, predicts x_{t+2+i}
(teacher at t+1+i) and attends to step-0 keys at positions <= t of its document plus the keys of steps 1..i at t.
A position is valid at step i when x_{t+2+i} is in t's document and loss_mask[t+2+i] == 1.

loss_i is the soft cross-entropy against softmax(teacher_logits) (already restricted to the draft vocabulary, so
renormalised over it) averaged over the valid positions of step i; loss = sum_i step_decay^i * loss_i.  Teacher
argmaxes outside the draft vocabulary are counted (num_out_of_vocab) and can never be matched.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from models.draft.attention import TTT_ATTENTION, document_segments


@dataclass
class TTTOutput:
    loss: Tensor  # scalar, sum_i decay^i * loss_i
    loss_per_step: Tensor  # (k,) detached
    correct_per_step: Tensor  # (k,) float
    count_per_step: Tensor  # (k,) float, valid positions per step
    num_out_of_vocab: Tensor  # () valid step-0 positions whose teacher argmax is outside the draft vocabulary

    def acc_per_step(self) -> Tensor:
        return self.correct_per_step / self.count_per_step.clamp(min=1)

    def tau_sim(self) -> float:
        """Simulated acceptance length of chain drafting: 1 + sum_i prod_{j<=i} acc_j."""
        return 1.0 + float(torch.cumprod(self.acc_per_step(), 0).sum())


def shift_left(x: Tensor, shift: int) -> Tensor:
    """x[:, t + shift] at t (B, L, ...), zero-padded at the right."""
    if shift == 0:
        return x
    pad = x.new_zeros(x.shape[0], min(shift, x.shape[1]), *x.shape[2:])
    return torch.cat([x[:, shift:], pad], 1)


def valid_positions(loss_mask: Tensor, document_ids: Tensor, step: int) -> Tensor:
    """(B, L) bool: position t trains at TTT step `step` (x_{t+2+step} in t's document and loss-masked)."""
    batch, length = document_ids.shape
    valid = torch.zeros(batch, length, dtype=torch.bool, device=document_ids.device)
    offset = 2 + step
    if offset < length:
        here, there = document_ids[:, : length - offset], document_ids[:, offset:]
        valid[:, : length - offset] = (here == there) & (here >= 0) & loss_mask[:, offset:].bool()
    return valid


def run_ttt_steps(
    draft,
    aux_hidden_states: Tensor,
    token_embeds: Tensor,
    position_ids: Tensor,
    document_ids: Tensor,
    ttt_steps: int,
    head: Callable[[int, Tensor], Tuple[Tensor, ...]],
) -> List[Tuple[Tensor, ...]]:
    """Unrolls the draft; head(step, out_hidden (B, L, H)) runs inside each step (and its checkpoint)."""
    attention = TTT_ATTENTION[draft.attention]
    segments = document_segments(document_ids) if draft.attention == "lean" else None
    hidden = draft.fuse_aux(aux_hidden_states)
    token_embeds = token_embeds.to(hidden.dtype)
    num_layers = len(draft.layers)
    keys: List[List[Tensor]] = [[] for _ in range(num_layers)]
    values: List[List[Tensor]] = [[] for _ in range(num_layers)]
    results = []
    for step in range(ttt_steps):
        past_keys, past_values = [tuple(k) for k in keys], [tuple(v) for v in values]

        def run(hidden, embeds, step=step, past_keys=past_keys, past_values=past_values):
            cos, sin = draft.rotary_emb(position_ids + step, hidden.dtype)
            new_kv = []
            for index, layer in enumerate(draft.layers):
                q, k, v, residual = layer.attention_inputs(embeds, hidden, cos, sin)
                attended = attention(
                    q, past_keys[index] + (k,), past_values[index] + (v,), layer.self_attn.scale, document_ids, segments
                )
                hidden = layer.finish(attended, residual)
                new_kv += [k, v]
            return (hidden, *new_kv, *head(step, hidden))

        embeds = shift_left(token_embeds, 1 + step)
        if draft.gradient_checkpointing and torch.is_grad_enabled():
            outputs = checkpoint(run, hidden, embeds, use_reentrant=False)
        else:
            outputs = run(hidden, embeds)
        hidden = draft.next_step_hidden(outputs[0])  # norm(out) for EAGLE 3.1 norm_output
        for index in range(num_layers):
            keys[index].append(outputs[1 + 2 * index])
            values[index].append(outputs[2 + 2 * index])
        results.append(tuple(outputs[1 + 2 * num_layers :]))
    return results


def ttt_forward(
    draft,
    input_ids: Tensor,
    aux_hidden_states: Tensor,
    teacher_logits: Tensor,
    teacher_argmax: Tensor,
    loss_mask: Tensor,
    position_ids: Tensor,
    document_ids: Tensor,
    ttt_steps: int = 7,
    step_decay: float = 0.8,
    inputs_embeds: Optional[Tensor] = None,
) -> TTTOutput:
    draft_vocab_size = draft.config.draft_vocab_size
    if teacher_logits.shape[-1] != draft_vocab_size:
        raise ValueError(f"teacher_logits last dim {teacher_logits.shape[-1]} != draft_vocab_size {draft_vocab_size}")
    if aux_hidden_states.shape[:2] != input_ids.shape or teacher_logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"batch shapes disagree: input_ids {tuple(input_ids.shape)}, aux {tuple(aux_hidden_states.shape)}, "
            f"teacher_logits {tuple(teacher_logits.shape)}"
        )
    token_embeds = draft.embed(input_ids) if inputs_embeds is None else inputs_embeds
    selected = [valid_positions(loss_mask, document_ids, step).nonzero(as_tuple=True) for step in range(ttt_steps)]

    def head(step, out_hidden):
        rows, cols = selected[step]
        logits = draft.compute_logits(out_hidden[rows, cols])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        teacher_probs = teacher_logits[rows, cols + 1 + step].to(logits.dtype).softmax(-1)
        loss_sum = F.cross_entropy(logits, teacher_probs, reduction="sum")
        hits = draft.to_target_ids(logits.argmax(-1)) == teacher_argmax[rows, cols + 1 + step]
        return loss_sum, hits.sum()

    per_step = run_ttt_steps(draft, aux_hidden_states, token_embeds, position_ids, document_ids, ttt_steps, head)
    loss_sums = torch.stack([loss_sum for loss_sum, _ in per_step])
    counts = torch.tensor([float(rows.numel()) for rows, _ in selected], device=loss_sums.device)
    losses = loss_sums / counts.clamp(min=1)
    decay = step_decay ** torch.arange(ttt_steps, dtype=losses.dtype, device=losses.device)
    rows, cols = selected[0]
    num_out_of_vocab = (~draft.t2d[teacher_argmax[rows, cols + 1]]).sum()
    return TTTOutput(
        loss=(decay * losses).sum(),
        loss_per_step=losses.detach(),
        correct_per_step=torch.stack([hits for _, hits in per_step]).float(),
        count_per_step=counts,
        num_out_of_vocab=num_out_of_vocab,
    )
