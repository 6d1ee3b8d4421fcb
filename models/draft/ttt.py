"""Training-time test (TTT): the Eagle3 draft unrolled for k steps on its own hidden states.

Step 0 at position t reads aux_t and embed(x_{t+1}) and predicts x_{t+2} (teacher: the target at t+1).  Step i
reads step i-1's out hidden at t and embed(x_{t+1+i}) at rotary position position_ids[t] + i, predicts
x_{t+2+i} (teacher at t+1+i) and attends to step-0 keys at positions <= t of its document plus the keys of
steps 1..i at t.  A position is valid at step i when x_{t+2+i} is in t's document and loss_mask[t+2+i] == 1.

loss_i is a per-position loss from models.objectives.losses (default: the soft cross-entropy against
softmax(teacher_logits), already restricted to the draft vocabulary, so renormalised over it), plus
optionally top1_weight * -log q(teacher argmax) where the teacher argmax is in the draft vocabulary,
averaged over the valid positions of step i; loss = sum_i step_decay^i * loss_i.  Teacher argmaxes
outside the draft vocabulary are counted (num_out_of_vocab) and can never be matched.  Per step it also
sums the teacher-forced acceptance alpha = sum_v min(p_v, q_v) (speculative sampling's, within the draft
vocabulary) for the logs.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from models.draft.attention import TTT_ATTENTION, document_segments
from models.objectives.losses import acceptance, top1_agreement
from models.registry import LOSSES


@dataclass
class TTTOutput:
    loss: Tensor  # scalar, sum_i decay^i * loss_i
    loss_per_step: Tensor  # (k,) detached
    correct_per_step: Tensor  # (k,) float
    count_per_step: Tensor  # (k,) float, valid positions per step
    num_out_of_vocab: Tensor  # () valid step-0 positions whose teacher argmax is outside the draft vocabulary
    accept_per_step: Optional[Tensor] = None  # (k,) sum over valid positions of sum_v min(p_v, q_v)


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


def _scatter_rows(x: Tensor, flat: Tensor, batch: int, length: int) -> Tensor:
    """(1, heads, N, d) at flat positions b * L + t -> (B, heads, L, d), zeros elsewhere (differentiable)."""
    rows = x[0].transpose(0, 1)  # (N, heads, d)
    full = rows.new_zeros(batch * length, *rows.shape[1:]).index_copy(0, flat, rows)
    return full.view(batch, length, *rows.shape[1:]).transpose(1, 2)


def _gather_rows(x: Tensor, flat: Tensor) -> Tensor:
    """(B, heads, L, d) -> (1, heads, N, d) at flat positions."""
    return x.transpose(1, 2).flatten(0, 1)[flat].transpose(0, 1)[None]


def _flat_alive(alive: List[Tensor]) -> Tuple[List[Tensor], List[Optional[Tensor]]]:
    """Flat indices of each step's alive positions, and where step i's sit among step i-1's."""
    flats = [mask.flatten().nonzero().squeeze(1) for mask in alive]
    carries: List[Optional[Tensor]] = [None]
    for previous, current in zip(flats[:-1], flats[1:]):
        where = torch.full((alive[0].numel(),), -1, dtype=torch.long, device=previous.device)
        where[previous] = torch.arange(previous.numel(), device=previous.device)
        carries.append(where[current])
    return flats, carries


def run_ttt_steps(
    draft,
    aux_hidden_states: Tensor,
    token_embeds: Tensor,
    position_ids: Tensor,
    document_ids: Tensor,
    ttt_steps: int,
    head: Callable[[int, Tensor], Tuple[Tensor, ...]],
    alive: Optional[List[Tensor]] = None,
) -> List[Tuple[Tensor, ...]]:
    """Unrolls the draft; head(step, out_hidden) runs inside each step (and its checkpoint).

    Without `alive`, every step runs on all positions and head gets out_hidden (B, L, H).  With alive,
    (B, L) bool per step, each inside the previous one (positions whose chain still has a trained step
    ahead), step 0 runs on all positions (its keys are everyone's context) and steps >= 1 only on their
    alive positions: projections, MLP and head see those rows alone, attention scatters them into the
    (B, L) layout.  head then gets out_hidden (N_i, H) at alive[step]'s positions in row-major order.
    """
    attention = TTT_ATTENTION[draft.attention]
    segments = document_segments(document_ids) if draft.attention == "lean" else None
    hidden = draft.fuse_aux(aux_hidden_states)
    token_embeds = token_embeds.to(hidden.dtype)
    batch, length = document_ids.shape
    flats, carries = _flat_alive(alive) if alive is not None else (None, None)
    num_layers = len(draft.layers)
    keys: List[List[Tensor]] = [[] for _ in range(num_layers)]
    values: List[List[Tensor]] = [[] for _ in range(num_layers)]
    results = []
    for step in range(ttt_steps):
        past_keys, past_values = [tuple(k) for k in keys], [tuple(v) for v in values]
        compact = flats is not None and step > 0
        flat = flats[step] if flats is not None else None

        def run(hidden, embeds, step=step, past_keys=past_keys, past_values=past_values, compact=compact,
                flat=flat):
            cos, sin = draft.rotary_emb(position_ids + step, hidden.dtype)
            if compact:
                cos, sin = cos.flatten(0, 1)[flat][None], sin.flatten(0, 1)[flat][None]
                hidden, embeds = hidden[None], embeds[None]
            new_kv = []
            for index, layer in enumerate(draft.layers):
                q, k, v, residual = layer.attention_inputs(embeds, hidden, cos, sin)
                if compact:
                    q, k, v = (_scatter_rows(x, flat, batch, length) for x in (q, k, v))
                attended = attention(
                    q, past_keys[index] + (k,), past_values[index] + (v,), layer.self_attn.scale,
                    document_ids, segments
                )
                hidden = layer.finish(_gather_rows(attended, flat) if compact else attended, residual)
                new_kv += [k, v]
            if compact:
                hidden = hidden[0]
            head_hidden = hidden if flat is None or compact else hidden.flatten(0, 1)[flat]
            return (hidden, *new_kv, *head(step, head_hidden))

        embeds = shift_left(token_embeds, 1 + step)
        if compact:
            hidden = hidden.flatten(0, 1)[flat] if step == 1 else hidden[carries[step]]
            embeds = embeds.flatten(0, 1)[flat]
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
    loss: str = "soft_ce",
    loss_cfg=None,
    top1_weight: float = 0.0,
    skip_dead: bool = True,
) -> TTTOutput:
    """The unrolled objective; `loss` names a per-position loss in LOSSES, its knobs read from `loss_cfg`.

    skip_dead: steps >= 1 run only on positions with a valid step still ahead (the same result, less work)."""
    loss_fn = LOSSES.get(loss)
    draft_vocab_size = draft.config.draft_vocab_size
    if teacher_logits.shape[-1] != draft_vocab_size:
        raise ValueError(f"teacher_logits last dim {teacher_logits.shape[-1]} != "
                         f"draft_vocab_size {draft_vocab_size}")
    if aux_hidden_states.shape[:2] != input_ids.shape or teacher_logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"batch shapes disagree: input_ids {tuple(input_ids.shape)}, "
            f"aux {tuple(aux_hidden_states.shape)}, teacher_logits {tuple(teacher_logits.shape)}"
        )
    token_embeds = draft.embed(input_ids) if inputs_embeds is None else inputs_embeds
    valid = [valid_positions(loss_mask, document_ids, step) for step in range(ttt_steps)]
    selected = [mask.nonzero(as_tuple=True) for mask in valid]
    alive, picks = None, None
    if skip_dead:
        alive = list(itertools.accumulate(reversed(valid), torch.logical_or))[::-1]
        picks = [(mask[here]).nonzero().squeeze(1) for mask, here in zip(valid, alive)]  # valid among alive

    def head(step, out_hidden):
        rows, cols = selected[step]
        logits = draft.compute_logits(out_hidden[picks[step]] if skip_dead else out_hidden[rows, cols])
        logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
        teacher = teacher_logits[rows, cols + 1 + step].to(logits.dtype)
        argmax = teacher_argmax[rows, cols + 1 + step]
        per_position = loss_fn(logits, teacher, loss_cfg)
        if top1_weight:
            per_position = per_position + top1_weight * draft.t2d[argmax] * top1_agreement(logits, teacher)
        hits = draft.to_target_ids(logits.argmax(-1)) == argmax
        with torch.no_grad():
            accepted = acceptance(logits, teacher).sum()
        return per_position.sum(), hits.sum(), accepted

    per_step = run_ttt_steps(draft, aux_hidden_states, token_embeds, position_ids, document_ids, ttt_steps,
                             head, alive)
    loss_sums = torch.stack([loss_sum for loss_sum, _, _ in per_step])
    counts = torch.tensor([float(rows.numel()) for rows, _ in selected], device=loss_sums.device)
    losses = loss_sums / counts.clamp(min=1)
    decay = step_decay ** torch.arange(ttt_steps, dtype=losses.dtype, device=losses.device)
    rows, cols = selected[0]
    num_out_of_vocab = (~draft.t2d[teacher_argmax[rows, cols + 1]]).sum()
    return TTTOutput(
        loss=(decay * losses).sum(),
        loss_per_step=losses.detach(),
        correct_per_step=torch.stack([hits for _, hits, _ in per_step]).float(),
        count_per_step=counts,
        num_out_of_vocab=num_out_of_vocab,
        accept_per_step=torch.stack([accepted for _, _, accepted in per_step]),
    )
