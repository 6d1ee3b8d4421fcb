"""The TTT objective vs a naive dense-mask unroll written here; packing; checkpointing; accuracy
bookkeeping."""
from types import SimpleNamespace

import pytest
import torch

from models.draft.ttt import run_ttt_steps, ttt_forward

STEPS = 3


def soft_ce(logits_row, teacher_row, in_vocab):
    return -(teacher_row.softmax(-1) * logits_row.log_softmax(-1)).sum()


def naive_ttt(draft, batch, steps, decay, position_loss=soft_ce):
    """Independent reference: every step attends over all steps' keys with a full (L, L * steps) mask."""
    input_ids, doc, pos = batch["input_ids"], batch["document_ids"], batch["position_ids"]
    teacher, argmax, mask = batch["teacher_logits"], batch["teacher_argmax"], batch["loss_mask"]
    B, L = input_ids.shape
    same_doc = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(L, L, dtype=torch.bool).tril()
    eye = torch.eye(L, dtype=torch.bool)
    hidden = draft.fc(batch["aux_hidden_states"])
    embeds = draft.embed_tokens(input_ids)
    keys = [[] for _ in draft.layers]
    values = [[] for _ in draft.layers]
    losses, correct, counts = [], [], []
    for i in range(steps):
        tokens = torch.zeros_like(embeds)
        tokens[:, : L - 1 - i] = embeds[:, 1 + i :]
        cos, sin = draft.rotary_emb(pos + i, hidden.dtype)
        for index, layer in enumerate(draft.layers):
            q, k, v, residual = layer.attention_inputs(tokens, hidden, cos, sin)
            keys[index].append(k)
            values[index].append(v)
            blocks = ([causal & same_doc] + [eye.expand(B, L, L)] * i
                      + [torch.zeros(B, L, L, dtype=torch.bool)] * (steps - 1 - i))
            full_mask = torch.cat(blocks, -1)  # (B, L, L * steps)
            pad = [torch.zeros_like(k)] * (steps - 1 - i)
            groups = q.shape[1] // k.shape[1]
            all_k = torch.cat(keys[index] + pad, 2).repeat_interleave(groups, 1)
            all_v = torch.cat(values[index] + pad, 2).repeat_interleave(groups, 1)
            scores = q @ all_k.transpose(-1, -2) * layer.self_attn.scale
            probs = scores.masked_fill(~full_mask[:, None], float("-inf")).softmax(-1)
            hidden = layer.finish(probs @ all_v, residual)
        logits = draft.lm_head(draft.norm(hidden))
        loss_sum, hits, count = 0.0, 0, 0
        for b in range(B):
            for t in range(L):
                target = t + 2 + i
                if target < L and doc[b, t] >= 0 and doc[b, target] == doc[b, t] and mask[b, target]:
                    in_vocab = bool(draft.t2d[argmax[b, t + 1 + i]])
                    loss_sum = loss_sum + position_loss(logits[b, t], teacher[b, t + 1 + i], in_vocab)
                    predicted = int(logits[b, t].argmax()) + int(draft.d2t[logits[b, t].argmax()])
                    hits += int(predicted == int(argmax[b, t + 1 + i]))
                    count += 1
        losses.append(loss_sum / max(count, 1))
        correct.append(hits)
        counts.append(count)
    total = sum(decay**i * loss for i, loss in enumerate(losses))
    return total, torch.stack([torch.as_tensor(x) for x in losses]), correct, counts


def run(draft, batch, steps=STEPS, decay=0.8):
    return ttt_forward(draft, **batch, ttt_steps=steps, step_decay=decay)


ROWS = {"padded": [[20], [24], [13]], "packed": [[7, 9, 5], [3, 18]]}


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("num_layers", [1, 2])
def test_ttt_matches_naive_reference(draft_factory, batch_factory, layout, num_layers):
    draft = draft_factory(num_layers=num_layers)
    batch = batch_factory(ROWS[layout], 24)
    out = run(draft, batch)
    ref_loss, ref_losses, ref_correct, ref_counts = naive_ttt(draft, batch, STEPS, 0.8)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.loss_per_step, ref_losses.detach(), rtol=1e-6, atol=0)
    assert out.count_per_step.tolist() == ref_counts
    assert out.correct_per_step.tolist() == ref_correct
    params = draft.trainable_parameters()
    grads = torch.autograd.grad(out.loss, params)
    ref_grads = torch.autograd.grad(ref_loss, params)
    for grad, ref_grad in zip(grads, ref_grads):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-10)


def lk_hybrid_plus_top1(logits_row, teacher_row, in_vocab, eta=3.0, top1_weight=0.5):
    p, q = teacher_row.softmax(-1), logits_row.softmax(-1)
    alpha = torch.minimum(p, q).sum()
    weight = torch.exp(-eta * alpha.detach())
    hybrid = weight * (p * (p.log() - q.log())).sum() + (1 - weight) * (1 - alpha)
    return hybrid - top1_weight * in_vocab * q[p.argmax()].log()


def test_registered_loss_and_top1_term_match_naive_reference(draft_factory, batch_factory):
    draft = draft_factory()
    batch = batch_factory(ROWS["packed"], 24)
    batch["teacher_argmax"] = draft.to_target_ids(batch["teacher_logits"].argmax(-1))  # in vocab
    batch["teacher_argmax"][0, :6] = (~draft.t2d).nonzero()[0]  # ... except a few: no top-1 term there
    cfg = SimpleNamespace(hybrid_eta=3.0)
    out = ttt_forward(draft, **batch, ttt_steps=STEPS, step_decay=0.8, loss="lk_hybrid", loss_cfg=cfg,
                      top1_weight=0.5)
    ref_loss, ref_losses, _, _ = naive_ttt(draft, batch, STEPS, 0.8, lk_hybrid_plus_top1)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-9, atol=0)
    torch.testing.assert_close(out.loss_per_step, ref_losses.detach(), rtol=1e-9, atol=0)
    params = draft.trainable_parameters()
    for grad, ref_grad in zip(torch.autograd.grad(out.loss, params), torch.autograd.grad(ref_loss, params)):
        torch.testing.assert_close(grad, ref_grad, rtol=1e-6, atol=1e-12)


def test_acceptance_per_step_is_the_teacher_forced_overlap(draft_factory, batch_factory):
    draft = draft_factory()
    batch = batch_factory(ROWS["padded"], 24)
    out = run(draft, batch)

    def overlap(logits_row, teacher_row, in_vocab):
        return torch.minimum(teacher_row.softmax(-1), logits_row.softmax(-1)).sum()

    with torch.no_grad():
        _, per_step_mean, _, counts = naive_ttt(draft, batch, STEPS, 0.8, overlap)
    torch.testing.assert_close(out.accept_per_step, per_step_mean * torch.tensor(counts, dtype=torch.float64),
                               rtol=1e-9, atol=1e-12)


def test_dense_path_checkpointing_and_all_positions_match_lean(draft_factory, batch_factory):
    batch = batch_factory(ROWS["packed"], 24)
    results = []
    variants = (("lean", False, True), ("dense", False, True), ("lean", True, True), ("lean", False, False))
    for attention, checkpointing, skip_dead in variants:  # skip_dead=False: steps >= 1 on every position
        draft = draft_factory(attention=attention, gradient_checkpointing=checkpointing)
        out = ttt_forward(draft, **batch, ttt_steps=STEPS, step_decay=0.8, skip_dead=skip_dead)
        results.append((out.loss, torch.autograd.grad(out.loss, draft.trainable_parameters())))
    for loss, grads in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-9, atol=0)
        for grad, base in zip(grads, results[0][1]):
            torch.testing.assert_close(grad, base, rtol=1e-7, atol=1e-12)


def test_packed_row_equals_conversations_one_by_one(draft_factory, batch_factory):
    draft = draft_factory()
    lengths = [9, 6, 11]
    packed = batch_factory([lengths], 30)
    sums = torch.zeros(STEPS, dtype=torch.float64)
    counts = torch.zeros(STEPS)
    correct = torch.zeros(STEPS)
    start = 0
    for n in lengths:
        single = {key: value[:, start : start + n].clone() for key, value in packed.items()}
        single["document_ids"].zero_()
        out = run(draft, single)
        sums += out.loss_per_step * out.count_per_step
        counts += out.count_per_step
        correct += out.correct_per_step
        start += n
    out = run(draft, packed)
    torch.testing.assert_close(out.loss_per_step * out.count_per_step, sums, rtol=1e-9, atol=1e-12)
    assert out.count_per_step.tolist() == counts.tolist()
    assert out.correct_per_step.tolist() == correct.tolist()


def test_out_of_vocab_counted_and_never_correct(draft_factory, batch_factory):
    draft = draft_factory()
    batch = batch_factory([[16]], 16)
    outside = (~draft.t2d).nonzero().flatten()
    batch["teacher_argmax"] = outside[torch.arange(16) % outside.numel()][None]
    batch["loss_mask"].fill_(1)
    out = run(draft, batch)
    assert int(out.num_out_of_vocab) == 14  # positions 0..13 are valid at step 0
    assert out.correct_per_step.sum() == 0
    assert out.count_per_step.tolist() == [14.0, 13.0, 12.0]
    # a teacher argmax equal to the draft's own step-0 prediction (as a target id) is counted correct
    with torch.no_grad():
        embeds = draft.embed(batch["input_ids"])
        (logits,), = run_ttt_steps(
            draft, batch["aux_hidden_states"], embeds, batch["position_ids"], batch["document_ids"], 1,
            lambda step, hidden: (draft.compute_logits(hidden),),
        )
    batch["teacher_argmax"][:, 1:] = draft.to_target_ids(logits.argmax(-1))[:, :-1]
    out = run(draft, batch)
    assert int(out.num_out_of_vocab) == 0
    assert out.correct_per_step[0] == out.count_per_step[0] == 14


def test_bfloat16_aux_with_float32_draft(draft_factory, batch_factory):
    draft = draft_factory().float()
    batch = batch_factory(ROWS["padded"], 24)
    batch["aux_hidden_states"] = batch["aux_hidden_states"].bfloat16()
    batch["teacher_logits"] = batch["teacher_logits"].float()
    out = run(draft, batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and draft.fc.weight.grad is not None
    assert draft.embed_tokens.weight.grad is None
