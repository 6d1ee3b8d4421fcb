"""DFlash draft: the training forward equals vLLM's served forward (a naive reference written here from
qwen3_dflash.py / v1/spec_decode/dflash.py), on padded and packed batches; the loss matches it too."""
import math

import pytest
import torch
import torch.nn.functional as F

from data.vocab import build_draft_vocab
from models.draft.dflash import DFlashConfig, DFlashDraft
from models.draft.dflash_objective import (
    batch_generator,
    block_hidden,
    dflash_forward,
    sample_anchors,
    valid_anchors,
)

BLOCK, DRAFT_VOCAB = 5, 128  # DRAFT_VOCAB: the draft vocabulary of the conftest batches' teacher


def make_dflash(spec, seed=0):
    torch.manual_seed(seed)
    cfg = DFlashConfig(draft_vocab_size=DRAFT_VOCAB, block_size=BLOCK, num_layers=2, mask_token_id=7)
    draft = DFlashDraft.from_target(cfg, spec).double()
    draft.load_embedding(torch.randn(spec.vocab_size, spec.hidden_size, dtype=torch.float64))
    draft.set_draft_vocab(*build_draft_vocab(torch.randint(0, 1000, (spec.vocab_size,)), DRAFT_VOCAB))
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
        draft.mask_embedding.normal_()
    return draft


# ---- vLLM's served forward, written out naively ------------------------------------------------------------
def rms(x, weight, eps):
    """vLLM's RMSNorm.forward_native: normalised in float32, back to the input dtype, times the weight."""
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def neox_rope(x, positions, theta):
    """x (T, heads, d) at integer positions (T,): rotate-half (is_neox_style=True) as vLLM's get_rope (whose
    float32 cos/sin cache is float64 here, like the float64 draft's)."""
    d = x.shape[-1]
    inv = 1.0 / (theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    angle = torch.as_tensor(positions, dtype=torch.float64)[:, None] * inv
    cos, sin = (torch.cat([f, f], -1)[:, None] for f in (angle.cos(), angle.sin()))
    return x * cos + torch.cat([-x[..., d // 2:], x[..., :d // 2]], -1) * sin


def served_block_logits(draft, aux, positions, bonus_id, bonus_position, k):
    """Logits of the k mask slots after bonus_id; aux (C, A*Ht) and positions (C,) are the context."""
    c, eps, theta = draft.config, draft.config.rms_norm_eps, draft.config.rope_theta
    heads, kv_heads, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    ctx = rms(aux @ draft.fc.weight.T, draft.hidden_norm.weight, eps)  # combine_hidden_states + hidden_norm
    ids = [bonus_id] + [c.mask_token_id] * k
    h = torch.stack([draft.mask_embedding if i == c.mask_token_id
                     else draft.embed_tokens.weight[i] for i in ids])
    query_positions = [bonus_position + j for j in range(k + 1)]
    for layer in draft.layers:
        a = layer.self_attn
        # precompute_and_store_context_kv: k_proj/v_proj of the normed context, k_norm, RoPE at its positions
        ctx_k = neox_rope(rms((ctx @ a.k_proj.weight.T).view(-1, kv_heads, d), a.k_norm.weight, eps),
                          positions, theta)
        ctx_v = (ctx @ a.v_proj.weight.T).view(-1, kv_heads, d)
        x = rms(h, layer.input_layernorm.weight, eps)
        q = neox_rope(rms((x @ a.q_proj.weight.T).view(-1, heads, d), a.q_norm.weight, eps),
                      query_positions, theta)
        blk_k = neox_rope(rms((x @ a.k_proj.weight.T).view(-1, kv_heads, d), a.k_norm.weight, eps),
                          query_positions, theta)
        blk_v = (x @ a.v_proj.weight.T).view(-1, kv_heads, d)
        # non-causal: every query sees all
        keys, values = torch.cat([ctx_k, blk_k]), torch.cat([ctx_v, blk_v])
        out = torch.zeros(k + 1, heads, d, dtype=h.dtype)
        for head in range(heads):
            g = head // (heads // kv_heads)
            scores = q[:, head] @ keys[:, g].T / math.sqrt(d)
            out[:, head] = scores.softmax(-1) @ values[:, g]
        h = h + out.reshape(k + 1, heads * d) @ a.o_proj.weight.T
        m = layer.mlp
        y = rms(h, layer.post_attention_layernorm.weight, eps)
        h = h + (F.silu(y @ m.gate_proj.weight.T) * (y @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return rms(h, draft.norm.weight, eps)[1:] @ draft.lm_head.weight.T


def reference_blocks(draft, batch, anchors, keep):
    """{(row, block): served logits (S-1, Vd)} with the context of each anchor's verified prefix."""
    out = {}
    docs, pos = batch["document_ids"], batch["position_ids"]
    for row in range(anchors.shape[0]):
        for block in range(anchors.shape[1]):
            if not keep[row, block]:
                continue
            a = int(anchors[row, block])
            context = [t for t in range(a) if docs[row, t] == docs[row, a]]
            out[row, block] = served_block_logits(draft, batch["aux_hidden_states"][row, context],
                                                  pos[row, context], int(batch["input_ids"][row, a]),
                                                  int(pos[row, a]), BLOCK - 1)
    return out


@pytest.mark.parametrize("docs", [[[40], [27]], [[12, 9, 17], [30, 8]]], ids=["padded", "packed"])
def test_training_forward_equals_served_forward(docs, spec_factory, batch_factory):
    draft = make_dflash(spec_factory())
    batch = batch_factory(docs, 40)
    valid = valid_anchors(batch["loss_mask"], batch["document_ids"])
    anchors, keep = sample_anchors(valid, 6, torch.Generator().manual_seed(0))
    assert keep.sum() >= 8
    with torch.no_grad():
        logits = draft.compute_logits(block_hidden(draft, batch["input_ids"], batch["aux_hidden_states"],
                                                   batch["position_ids"], batch["document_ids"], anchors))
        reference = reference_blocks(draft, batch, anchors, keep)
    for (row, block), expected in reference.items():
        torch.testing.assert_close(logits[row, block], expected, rtol=1e-6, atol=1e-7)


def test_inference_api_equals_served_forward(spec_factory, batch_factory):
    draft = make_dflash(spec_factory(), 1)
    batch = batch_factory([[30]], 30, seed=3)
    aux, pos, ids = batch["aux_hidden_states"][0], batch["position_ids"][0], batch["input_ids"][0]
    context = draft.new_context()
    with torch.no_grad():
        draft.extend_context(aux[None, :10], pos[None, :10], context)
        draft.extend_context(aux[None, 10:20], pos[None, 10:20], context)  # chunks append like one call
        for k in (1, 3, BLOCK - 1):
            logits = draft.draft_block(ids[20:21], pos[20:21], k, context)[0]
            torch.testing.assert_close(logits,
                                       served_block_logits(draft, aux[:20], pos[:20], int(ids[20]), 20, k))
        context.crop(12)
        torch.testing.assert_close(draft.draft_block(ids[12:13], pos[12:13], 2, context)[0],
                                   served_block_logits(draft, aux[:12], pos[:12], int(ids[12]), 12, 2))
    with pytest.raises(ValueError, match="block_size"):
        draft.draft_block(ids[12:13], pos[12:13], BLOCK, context)


@pytest.mark.parametrize("docs", [[[40], [27]], [[12, 9, 17], [30, 8]]], ids=["padded", "packed"])
def test_loss_is_the_position_weighted_soft_cross_entropy_of_the_served_logits(docs, spec_factory,
                                                                               batch_factory):
    draft = make_dflash(spec_factory(), 2)
    batch = batch_factory(docs, 40, seed=1)
    valid = valid_anchors(batch["loss_mask"], batch["document_ids"])
    anchors, keep = sample_anchors(valid, 5, torch.Generator().manual_seed(1))
    out = dflash_forward(draft, batch["input_ids"], batch["aux_hidden_states"], batch["teacher_logits"],
                         batch["teacher_argmax"], batch["loss_mask"], batch["position_ids"],
                         batch["document_ids"], loss_decay=2.0, anchors=anchors, keep=keep)
    sums, counts, correct = torch.zeros(BLOCK - 1), torch.zeros(BLOCK - 1), torch.zeros(BLOCK - 1)
    with torch.no_grad():
        for (row, block), logits in reference_blocks(draft, batch, anchors, keep).items():
            a, doc = int(anchors[row, block]), batch["document_ids"][row, int(anchors[row, block])]
            for j in range(1, BLOCK):
                t = a + j
                if t >= 40 or batch["document_ids"][row, t] != doc or not batch["loss_mask"][row, t]:
                    continue
                teacher = batch["teacher_logits"][row, t - 1].softmax(-1)
                sums[j - 1] += -(teacher * logits[j - 1].log_softmax(-1)).sum()
                counts[j - 1] += 1
                correct[j - 1] += float(draft.d2t[logits[j - 1].argmax()] + logits[j - 1].argmax()
                                        == batch["teacher_argmax"][row, t - 1])
    weights = torch.exp(-torch.arange(BLOCK - 1, dtype=torch.float64) / 2.0)
    expected = (weights * sums / counts.clamp(min=1)).sum() / weights.sum()
    assert counts.sum() > 10
    torch.testing.assert_close(out.count_per_step, counts.double())
    torch.testing.assert_close(out.correct_per_step, correct.double())
    torch.testing.assert_close(out.loss, expected.double())
    out.loss.backward()
    assert draft.mask_embedding.grad.abs().sum() > 0 and draft.embed_tokens.weight.grad is None


def test_anchors_are_valid_deterministic_and_capped(batch_factory):
    batch = batch_factory([[12, 9, 17], [30, 8]], 40, seed=2)
    valid = valid_anchors(batch["loss_mask"], batch["document_ids"])
    docs, mask = batch["document_ids"], batch["loss_mask"]
    for row in range(2):
        for a in range(1, 39):
            expected = bool(docs[row, a] >= 0 and docs[row, a - 1] == docs[row, a] == docs[row, a + 1]
                            and mask[row, a + 1])
            assert bool(valid[row, a]) == expected
    first = sample_anchors(valid, 4, batch_generator(batch["input_ids"]))
    again = sample_anchors(valid, 4, batch_generator(batch["input_ids"]))
    assert torch.equal(first[0], again[0]) and first[0].shape == (2, 4)
    anchors, keep = first
    assert all(valid[row, int(anchors[row, i])] for row, i in keep.nonzero().tolist())
    many, keep = sample_anchors(valid, 1000, torch.Generator().manual_seed(0))
    assert torch.equal(keep.sum(1), valid.sum(1))
    assert all((many[row, keep[row]].diff() > 0).all() for row in range(2))


def test_config_errors_name_the_setting(spec_factory):
    spec = spec_factory()
    with pytest.raises(ValueError, match="draft.mask_token_id"):
        DFlashDraft.from_target(DFlashConfig(mask_token_id=spec.vocab_size), spec)
    with pytest.raises(ValueError, match="block_size"):
        DFlashDraft.from_target(DFlashConfig(block_size=1), spec)
    with pytest.raises(ValueError, match="M-RoPE"):
        DFlashDraft.from_target(DFlashConfig(), spec_factory(rope_scaling={"mrope_section": [2, 3, 3]}))
