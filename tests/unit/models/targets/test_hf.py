"""HFTargetModel: aux capture, padding/packing awareness, chunked teacher logits, lm-head-only loading."""
import pytest
import torch

from models.registry import TARGETS
from models.targets.base import (
    TargetConfig,
    from_sglang_layer_ids,
    resolve_aux_layer_ids,
    to_sglang_layer_ids,
)
from models.targets.teacher import load_lm_head_only, target_head_weights
from tests.helpers import DRAFT_VOCAB, make_draft, save_tiny

AUX = [1, 2, 3]


def load(path, **kwargs):
    cfg = TargetConfig(path=path, dtype="float32", aux_layer_ids=AUX, **kwargs)
    return TARGETS.get("hf").load(cfg)


def single_batch(ids):
    ids = torch.as_tensor(ids)[None]
    n = ids.shape[1]
    return {"input_ids": ids, "position_ids": torch.arange(n)[None],
            "document_ids": torch.zeros(1, n, dtype=torch.long),
            "loss_mask": torch.ones(1, n, dtype=torch.long)}


def samples(lengths, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 512, (n,), generator=g) for n in lengths]


DRAFT_IDS = torch.tensor([0, 3, 7, 100, 511])


@pytest.mark.parametrize("name", ["llama", "qwen2", "qwen2_moe"])
def test_aux_states_match_output_hidden_states(tiny_dirs, name):
    target = load(tiny_dirs[name])
    batch = single_batch(samples([20])[0])
    out = target(batch, DRAFT_IDS, return_last_hidden=True)
    ref = target.module(input_ids=batch["input_ids"], output_hidden_states=True)
    expected = torch.cat([ref.hidden_states[i] for i in AUX], dim=-1)
    torch.testing.assert_close(out.aux_hidden_states, expected)
    torch.testing.assert_close(out.teacher_logits, ref.logits.float()[..., DRAFT_IDS])
    assert torch.equal(out.teacher_argmax, ref.logits.argmax(-1))
    assert out.last_hidden_state.shape == (1, 20, 64) and out.inputs_embeds is None
    assert target.spec.num_layers == 4 and target.spec.aux_layer_ids == AUX and target.spec.hidden_size == 64
    assert not any(p.requires_grad for p in target.module.parameters()) and not target.module.training


def test_padded_batch_equals_per_sample(tiny_dirs):
    target = load(tiny_dirs["llama"])
    seqs = samples([5, 17, 11])
    length = max(len(s) for s in seqs)
    batch = {"input_ids": torch.zeros(3, length, dtype=torch.long),
             "position_ids": torch.zeros(3, length, dtype=torch.long),
             "document_ids": torch.full((3, length), -1)}
    for r, s in enumerate(seqs):
        batch["input_ids"][r, :len(s)] = s
        batch["position_ids"][r, :len(s)] = torch.arange(len(s))
        batch["document_ids"][r, :len(s)] = 0
    out = target(batch, DRAFT_IDS)
    for r, s in enumerate(seqs):
        one = target(single_batch(s), DRAFT_IDS)
        n = len(s)
        torch.testing.assert_close(out.aux_hidden_states[r, :n], one.aux_hidden_states[0],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.teacher_logits[r, :n], one.teacher_logits[0], atol=1e-5, rtol=1e-5)
        assert torch.equal(out.teacher_argmax[r, :n], one.teacher_argmax[0])
    assert torch.isfinite(out.aux_hidden_states).all()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_equals_separate_runs(tiny_dirs, attn):
    target = load(tiny_dirs["qwen2"], attn_implementation=attn)
    seqs = samples([6, 9, 4], seed=2)
    packed = {"input_ids": torch.cat(seqs)[None],
              "position_ids": torch.cat([torch.arange(len(s)) for s in seqs])[None],
              "document_ids": torch.cat([torch.full((len(s),), d) for d, s in enumerate(seqs)])[None]}
    out = target(packed, DRAFT_IDS)
    start = 0
    for s in seqs:
        one = target(single_batch(s), DRAFT_IDS)
        torch.testing.assert_close(out.aux_hidden_states[0, start:start + len(s)], one.aux_hidden_states[0],
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.teacher_logits[0, start:start + len(s)], one.teacher_logits[0],
                                   atol=1e-5, rtol=1e-5)
        start += len(s)


def test_chunked_teacher_logits_equal_full(tiny_dirs):
    chunked = load(tiny_dirs["llama"], logits_chunk_size=7)
    hidden = torch.randn(3, 13, 64)
    logits, argmax = chunked.teacher_from_hidden(hidden, DRAFT_IDS)
    full = chunked.module.lm_head(chunked.decoder.norm(hidden)).float()
    torch.testing.assert_close(logits, full[..., DRAFT_IDS])
    assert torch.equal(argmax, full.argmax(-1))


@pytest.mark.parametrize("tie", [False, True])
def test_lm_head_only_matches_target(tmp_path, tie):
    path = save_tiny(tmp_path / "m", "llama", tie=tie)
    cfg = TargetConfig(path=path, dtype="float32", aux_layer_ids=AUX, logits_chunk_size=5)
    target = TARGETS.get("hf").load(cfg)
    head = load_lm_head_only(cfg)
    hidden = torch.randn(2, 9, 64)
    expected = target.teacher_from_hidden(hidden, DRAFT_IDS)
    got = head.teacher_from_hidden(hidden, DRAFT_IDS)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not any(p.requires_grad for p in head.parameters())


@pytest.mark.parametrize("tie", [False, True])
def test_draft_head_starts_as_the_targets_readout(tmp_path, tie):
    """draft.init_head=target: the draft's norm + lm_head give the target's logits on the draft vocabulary."""
    path = save_tiny(tmp_path / "m", "llama", tie=tie)
    target = load(path)
    draft = make_draft().float()
    norm, lm_head = target_head_weights(TargetConfig(path=path, dtype="float32", aux_layer_ids=AUX))
    online = target.head_weights()  # offline reads the files, online the loaded target: the same weights
    assert torch.equal(online[0], norm) and torch.equal(online[1], lm_head)
    draft.load_head(norm, lm_head)
    hidden = torch.randn(2, 9, 64)
    expected = target.module.lm_head(target.decoder.norm(hidden))[..., draft.draft_token_ids()]
    torch.testing.assert_close(draft.compute_logits(hidden), expected)
    assert draft.lm_head.weight.shape[0] == DRAFT_VOCAB
    with pytest.raises(ValueError, match="draft.init_head=target"):  # a draft narrower than the target
        draft.load_head(norm[:32], lm_head[:, :32])


def test_embed_tokens_weight_and_dtype(tiny_dirs):
    target = TARGETS.get("hf").load(TargetConfig(path=tiny_dirs["llama"], dtype="bfloat16",
                                                 aux_layer_ids=AUX))
    weight = target.embed_tokens_weight()
    assert weight.shape == (512, 64) and weight.dtype == torch.bfloat16
    out = target(single_batch(samples([8])[0]), DRAFT_IDS)
    assert out.aux_hidden_states.dtype == torch.bfloat16 and out.teacher_logits.dtype == torch.float32


def test_aux_layer_ids_rules():
    assert resolve_aux_layer_ids(None, 32) == [2, 16, 29]
    assert to_sglang_layer_ids([2, 16, 29]) == [1, 15, 28]
    assert from_sglang_layer_ids([1, 15, 28]) == [2, 16, 29]
    with pytest.raises(ValueError, match="out of range"):
        resolve_aux_layer_ids([0, 3], 8)
    with pytest.raises(ValueError, match="out of range"):
        resolve_aux_layer_ids([8], 8)
    with pytest.raises(ValueError, match=">= 4"):
        resolve_aux_layer_ids(None, 3)


def test_unsupported_attention_rejected(tiny_dirs):
    with pytest.raises(ValueError, match="sdpa"):
        load(tiny_dirs["llama"], attn_implementation="flash_attention_2")
