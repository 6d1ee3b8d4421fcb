"""EAGLE 3.1 switches of the Eagle3 draft, as vLLM's llama_eagle3.py defines them: fc inputs normed
(norm_before_fc: one RMSNorm over the concatenation; fc_norm: one per aux layer), norm_output (the next step
reads norm(out)); TTT reproduces the KV-cache inference with every switch."""
import pytest
import torch

from models.draft.ttt import run_ttt_steps, ttt_forward

VARIANTS = {"norm_before_fc": dict(norm_before_fc=True), "fc_norm": dict(fc_norm=True),
            "norm_output": dict(norm_output=True),
            "all": dict(norm_before_fc=True, fc_norm=True, norm_output=True)}


def rms(x, weight, eps):
    x32 = x.to(torch.float32)
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype) * weight


def test_parameters_and_names(draft_factory):
    draft = draft_factory(**VARIANTS["all"])
    names = dict(draft.state_dict())
    assert names["input_norm.weight"].shape == (3 * 64,)
    assert [names[f"fc_norm.{i}.weight"].shape for i in range(3)] == [(64,)] * 3
    assert "input_norm.weight" not in draft_factory().state_dict()


@pytest.mark.parametrize("variant", ["norm_before_fc", "fc_norm", "all"])
def test_fc_inputs_normed_as_vllm_combine_hidden_states(draft_factory, variant):
    draft = draft_factory(**VARIANTS[variant])
    aux = torch.randn(2, 5, 3 * 64, dtype=torch.float64)
    eps, x = draft.config.rms_norm_eps, aux
    if draft.config.norm_before_fc:
        x = rms(x, draft.input_norm.weight, eps)
    if draft.config.fc_norm:
        x = torch.cat([rms(c, n.weight, eps) for n, c in zip(draft.fc_norm, x.chunk(3, -1))], -1)
    torch.testing.assert_close(draft.fuse_aux(aux), x @ draft.fc.weight.T)


def test_norm_output_feeds_the_normed_state(draft_factory, batch_factory):
    plain, normed = draft_factory(seed=4), draft_factory(seed=4, norm_output=True)
    batch = batch_factory([[12]], 12, seed=5)
    aux, ids, pos = batch["aux_hidden_states"], batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        caches = plain.new_cache(), normed.new_cache()
        logits_a, out = plain.step(aux[:, :8], ids[:, 1:9], pos[:, :8], caches[0])
        logits_b, fed = normed.step(aux[:, :8], ids[:, 1:9], pos[:, :8], caches[1])
        torch.testing.assert_close(logits_a, logits_b)
        torch.testing.assert_close(fed, plain.norm(out))  # vLLM's aux_output = post-norm hidden states
        second_a, _ = plain.step(plain.norm(out[:, -1:]), ids[:, 9:10], pos[:, 7:8] + 1,
                                 caches[0], is_aux=False)
        second_b, _ = normed.step(fed[:, -1:], ids[:, 9:10], pos[:, 7:8] + 1, caches[1], is_aux=False)
        torch.testing.assert_close(second_a, second_b)
        assert not torch.allclose(second_b, plain.step(out[:, -1:], ids[:, 9:10], pos[:, 7:8] + 1,
                                                       plain.new_cache(), is_aux=False)[0])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_ttt_reproduces_step_inference(draft_factory, batch_factory, variant):
    draft = draft_factory(num_layers=2, **VARIANTS[variant])
    steps, length = 3, 16
    batch = batch_factory([[length]], length, seed=3)
    aux, ids, pos = batch["aux_hidden_states"], batch["input_ids"], batch["position_ids"]
    with torch.no_grad():
        per_step = run_ttt_steps(draft, aux, draft.embed(ids), pos, batch["document_ids"], steps,
                                 lambda step, hidden: (draft.compute_logits(hidden),))
        ttt_logits = [logits for (logits,) in per_step]
        for t in (3, 10):
            cache = draft.new_cache()
            logits, hidden = draft.step(aux[:, :t + 1], ids[:, 1:t + 2], pos[:, :t + 1], cache)
            torch.testing.assert_close(logits, ttt_logits[0][:, :t + 1], rtol=1e-9, atol=1e-10)
            hidden = hidden[:, -1:]
            for j in range(1, steps):
                logits, hidden = draft.step(hidden, ids[:, t + 1 + j:t + 2 + j], pos[:, t:t + 1] + j, cache)
                torch.testing.assert_close(logits[:, 0], ttt_logits[j][:, t], rtol=1e-9, atol=1e-10)
    out = ttt_forward(draft, **batch, ttt_steps=steps)
    out.loss.backward()
    trained = [draft.input_norm.weight] if draft.config.norm_before_fc else []
    trained += [n.weight for n in draft.fc_norm] if draft.config.fc_norm else []
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
