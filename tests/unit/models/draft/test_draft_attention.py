"""Lean TTT attention (fused causal part + per-position extras merged by log-sum-exp) vs a naive dense
mask."""
import pytest
import torch

from models.draft.attention import (
    _portable_causal_attention,
    dense_ttt_attention,
    document_segments,
    lean_ttt_attention,
)


def naive_attention(q, keys, values, scale, document_ids):
    """Full (L, L * k) mask over all steps' keys; plain softmax; written independently of the module."""
    batch, heads, length, _ = q.shape
    groups = heads // keys[0].shape[1]
    step = len(keys) - 1
    out = torch.zeros_like(q)
    for b in range(batch):
        for t in range(length):
            cols, vals = [], []
            for j, (k, v) in enumerate(zip(keys, values)):
                for s in range(length):
                    if (j == 0 and s <= t and document_ids[b, s] == document_ids[b, t]) or (j > 0 and s == t):
                        cols.append(k[b, :, s])
                        vals.append(v[b, :, s])
            k_t = torch.stack(cols, 1).repeat_interleave(groups, 0)  # (heads, n, d)
            v_t = torch.stack(vals, 1).repeat_interleave(groups, 0)
            probs = ((k_t @ q[b, :, t, :, None]).squeeze(-1) * scale).softmax(-1)
            out[b, :, t] = (probs[:, None] @ v_t).squeeze(1)
    assert step >= 0
    return out


def random_inputs(document_ids, steps, heads=4, kv_heads=2, head_dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch, length = document_ids.shape
    def rand(h):
        return torch.randn(batch, h, length, head_dim, generator=g, dtype=torch.float64).requires_grad_()

    return rand(heads), [rand(kv_heads) for _ in range(steps + 1)], [rand(kv_heads) for _ in range(steps + 1)]


PADDED = torch.tensor([[0] * 11 + [-1] * 3, [0] * 14])
PACKED = torch.tensor([[0] * 4 + [1] * 6 + [2] * 2 + [-1] * 2, [0] * 9 + [1] * 5])


@pytest.mark.parametrize("document_ids", [PADDED, PACKED], ids=["padded", "packed"])
@pytest.mark.parametrize("attention", ["lean", "dense", "portable"])
@pytest.mark.parametrize("step", [0, 1, 3])
def test_ttt_attention_matches_naive_mask(document_ids, attention, step):
    q, keys, values = random_inputs(document_ids, step)
    segments = document_segments(document_ids)
    scale = 0.3
    if attention == "lean":
        out = lean_ttt_attention(q, keys, values, scale, document_ids, segments)
    elif attention == "dense":
        out = dense_ttt_attention(q, keys, values, scale, document_ids)
    else:  # the non-CPU causal path, exercised here on CPU
        import models.draft.attention as attention_module

        original = attention_module.causal_attention_with_lse
        attention_module.causal_attention_with_lse = lambda q, k, v, s, d, _: _portable_causal_attention(
            q, k, v, s, d)
        try:
            out = lean_ttt_attention(q, keys, values, scale, document_ids, segments)
        finally:
            attention_module.causal_attention_with_lse = original
    reference = naive_attention(q, keys, values, scale, document_ids)
    weights = torch.randn(out.shape, dtype=torch.float64) * (document_ids >= 0)[:, None, :, None]
    torch.testing.assert_close(out * weights, reference * weights, rtol=1e-7, atol=1e-9)
    inputs = [q] + keys + values
    grads = torch.autograd.grad((out * weights).sum(), inputs)
    reference_grads = torch.autograd.grad((reference * weights).sum(), inputs)
    for grad, reference_grad in zip(grads, reference_grads):
        torch.testing.assert_close(grad, reference_grad, rtol=1e-7, atol=1e-9)


def test_document_segments():
    assert document_segments(PADDED) is None
    assert document_segments(PACKED) == [(0, 0, 4), (0, 4, 10), (0, 10, 12), (1, 0, 9), (1, 9, 14)]


def test_lean_attention_float32_and_bfloat16_close_to_dense():
    document_ids = PACKED
    q, keys, values = random_inputs(document_ids, 2)
    segments = document_segments(document_ids)
    reference = dense_ttt_attention(q, keys, values, 0.3, document_ids)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 3e-2)):
        cast = lambda xs: [x.detach().to(dtype) for x in xs]  # noqa: E731
        out = lean_ttt_attention(q.detach().to(dtype), cast(keys), cast(values), 0.3, document_ids, segments)
        assert out.dtype == dtype
        keep = (document_ids >= 0)[:, None, :, None]
        torch.testing.assert_close(out.double() * keep, reference.detach() * keep, rtol=tol, atol=tol)
