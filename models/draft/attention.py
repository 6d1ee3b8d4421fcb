"""Attention of one unrolled training-time-test (TTT) step of an Eagle3 draft.

At step i the query at position t attends to the step-0 keys at positions <= t of its own document and to
the keys of steps 1..i at position t only.  The lean path never builds a (L, L*k) score tensor: the causal
part runs through a fused kernel that also returns its log-sum-exp, the per-position extra keys are (L, i) dot
products, and both are merged exactly in log space.  The dense path builds the full mask and is the reference
for small L.

Shapes: queries (B, heads, L, head_dim); keys/values (B, kv_heads, L, head_dim) with heads % kv_heads == 0.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# (row, start, end) of each document; None means every row holds one document starting at 0 (padding after
# it), so one causal call over the whole batch is exact for all non-padding queries.
Segments = Optional[List[Tuple[int, int, int]]]

QUERY_CHUNK = 256  # queries per chunk of the portable (non-CPU) causal path


def document_segments(document_ids: Tensor) -> Segments:
    """Contiguous (row, start, end) runs of each document, padding (-1) excluded; None when no row is
    packed."""
    ids = document_ids.detach().cpu()
    if bool(((ids == 0) | (ids == -1)).all()):
        return None
    segments = []
    for row, row_ids in enumerate(ids.tolist()):
        start = 0
        for t in range(1, len(row_ids) + 1):
            if t == len(row_ids) or row_ids[t] != row_ids[start]:
                if row_ids[start] >= 0:
                    segments.append((row, start, t))
                start = t
    return segments


class _CpuCausalAttention(torch.autograd.Function):
    """Causal attention per segment with the CPU flash kernel; returns (out, lse), both differentiable.

    The kernel's backward ignores a gradient on the log-sum-exp.  It is folded in exactly by appending a zero
    column to q and k, a column of ones to v, passing [out, 0] as the output and [grad_out, grad_lse] as its
    gradient: the kernel's dS = P * (dO.v - dO.out) then gains the + grad_lse term that d(lse)/dS = P brings.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, segments):
        if segments is None:
            out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, True,
                                                                                  scale=scale)
        else:
            out = q.new_zeros(q.shape)
            lse = q.new_zeros(q.shape[:-1], dtype=torch.float32 if q.dtype != torch.float64 else q.dtype)
            for row, start, end in segments:
                seg_out, seg_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                    *(x[row : row + 1, :, start:end].contiguous() for x in (q, k, v)), 0.0, True, scale=scale
                )
                out[row : row + 1, :, start:end] = seg_out
                lse[row : row + 1, :, start:end] = seg_lse
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.segments = scale, segments
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, out, lse = ctx.saved_tensors
        if grad_out is None:
            grad_out = torch.zeros_like(out)
        if grad_lse is None:
            grad_lse = torch.zeros_like(lse)
        zeros_q, zeros_k = q.new_zeros(*q.shape[:-1], 1), k.new_zeros(*k.shape[:-1], 1)
        q_aug, k_aug = torch.cat([q, zeros_q], -1), torch.cat([k, zeros_k], -1)
        v_aug = torch.cat([v, torch.ones_like(zeros_k)], -1)
        out_aug = torch.cat([out, zeros_q], -1)
        grad_aug = torch.cat([grad_out.to(q.dtype), grad_lse.to(q.dtype).unsqueeze(-1)], -1)
        backward = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward
        if ctx.segments is None:
            gq, gk, gv = backward(grad_aug, q_aug, k_aug, v_aug, out_aug, lse, 0.0, True, scale=ctx.scale)
        else:
            gq, gk, gv = torch.zeros_like(q_aug), torch.zeros_like(k_aug), torch.zeros_like(v_aug)
            for row, start, end in ctx.segments:
                part = lambda x: x[row : row + 1, :, start:end].contiguous()  # noqa: E731
                seg_lse = lse[row : row + 1, :, start:end].contiguous()
                grads = backward(
                    part(grad_aug), part(q_aug), part(k_aug), part(v_aug), part(out_aug), seg_lse,
                    0.0, True, scale=ctx.scale,
                )
                for full, seg in zip((gq, gk, gv), grads):
                    full[row : row + 1, :, start:end] = seg
        return gq[..., :-1], gk[..., :-1], gv[..., :-1], None, None


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _chunk_attention(q_chunk, k, v, allowed, scale):
    groups = q_chunk.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = (q_chunk @ k.transpose(-1, -2)).to(_compute_dtype(q_chunk)) * scale
    scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    lse = scores.logsumexp(-1)
    out = (scores - lse.unsqueeze(-1)).exp().to(v.dtype) @ v
    return out, lse


def _portable_causal_attention(q, k, v, scale, document_ids):
    """Exact causal/document attention chunked over queries, each chunk checkpointed: memory O(L * chunk)."""
    length = q.shape[2]
    positions = torch.arange(length, device=q.device)
    outs, lses = [], []
    for start in range(0, length, QUERY_CHUNK):
        end = min(start + QUERY_CHUNK, length)
        allowed = (positions[None, start:end, None] >= positions[None, None, :end]) & (
            document_ids[:, start:end, None] == document_ids[:, None, :end]
        )
        allowed = allowed | (positions[start:end, None] == positions[None, :end])  # padding sees itself
        args = (q[:, :, start:end], k[:, :, :end], v[:, :, :end], allowed, scale)
        if torch.is_grad_enabled():
            out, lse = checkpoint(_chunk_attention, *args, use_reentrant=False)
        else:
            out, lse = _chunk_attention(*args)
        outs.append(out)
        lses.append(lse)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def causal_attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, scale: float, document_ids: Tensor, segments: Segments
) -> Tuple[Tensor, Tensor]:
    """Causal attention within documents; returns out (like q) and the log-sum-exp of the scores
    (B, heads, L).

    Values at padding positions are finite but meaningless.
    """
    if q.device.type == "cpu":
        return _CpuCausalAttention.apply(q, k, v, scale, segments)
    return _portable_causal_attention(q, k, v, scale, document_ids)


def lean_ttt_attention(
    q: Tensor,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    scale: float,
    document_ids: Tensor,
    segments: Segments,
) -> Tensor:
    """Attention of TTT step i = len(keys) - 1; keys[0]/values[0] are step 0's, keys[j] step j's (same
    positions)."""
    out, lse = causal_attention_with_lse(q, keys[0], values[0], scale, document_ids, segments)
    if len(keys) == 1:
        return out
    batch, heads, length, head_dim = q.shape
    kv_heads = keys[0].shape[1]
    grouped_q = q.view(batch, kv_heads, heads // kv_heads, length, head_dim)
    extra_k = torch.stack(list(keys[1:]), -2)  # (B, kv_heads, L, i, head_dim)
    extra_v = torch.stack(list(values[1:]), -2)
    dtype = _compute_dtype(q)
    extra_scores = torch.einsum("bkgld,bklid->bkgli", grouped_q, extra_k).to(dtype) * scale
    causal_lse = lse.to(dtype).view(batch, kv_heads, heads // kv_heads, length, 1)
    total_lse = torch.logsumexp(torch.cat([causal_lse, extra_scores], -1), -1, keepdim=True)
    causal_weight = (causal_lse - total_lse).exp()
    extra_probs = (extra_scores - total_lse).exp()
    merged = causal_weight * out.view(grouped_q.shape).to(dtype) + torch.einsum(
        "bkgli,bklid->bkgld", extra_probs, extra_v.to(dtype)
    )
    return merged.to(q.dtype).view(batch, heads, length, head_dim)


def dense_ttt_attention(
    q: Tensor,
    keys: Sequence[Tensor],
    values: Sequence[Tensor],
    scale: float,
    document_ids: Tensor,
    segments: Segments = None,
) -> Tensor:
    """Reference: one softmax over all steps' keys concatenated, (L, L * (i + 1)) mask.  Small L only."""
    length, steps = q.shape[2], len(keys)
    groups = q.shape[1] // keys[0].shape[1]
    k = torch.cat(list(keys), 2).repeat_interleave(groups, 1)
    v = torch.cat(list(values), 2).repeat_interleave(groups, 1)
    positions = torch.arange(length, device=q.device)
    causal = ((positions[:, None] >= positions[None, :])
              & (document_ids[:, :, None] == document_ids[:, None, :]))
    same_position = (positions[:, None] == positions[None, :]).expand_as(causal)
    mask = torch.cat([causal] + [same_position] * (steps - 1), -1)  # (B, L, L * steps)
    scores = (q @ k.transpose(-1, -2)).to(_compute_dtype(q)) * scale
    probs = scores.masked_fill(~mask[:, None], float("-inf")).softmax(-1)
    return (probs.to(v.dtype) @ v).to(q.dtype)


TTT_ATTENTION = {"lean": lean_ttt_attention, "dense": dense_ttt_attention}
