"""Eagle3 draft: configuration from the target, RoPE from the target, state-dict layout,
step inference == TTT."""
import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft, Eagle3ModelConfig
from models.draft.ttt import run_ttt_steps
from models.registry import DRAFTS


def test_registered_and_sizes_follow_target(spec_factory):
    assert DRAFTS.get("eagle3_llama") is Eagle3LlamaDraft
    draft = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=100000), spec_factory())
    c = draft.config
    assert (c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 4, 2, 16)
    assert (c.draft_vocab_size, c.vocab_size, c.num_aux_layers, c.aux_layer_ids) == (512, 512, 3, [2, 4, 5])
    assert draft.fc.weight.shape == (64, 3 * 64)
    assert draft.layers[0].self_attn.q_proj.weight.shape == (64, 128)
    assert draft.layers[0].self_attn.k_proj.weight.shape == (32, 128)
    assert bool((draft.d2t == 0).all()) and bool(draft.t2d.all())
    assert Eagle3ModelConfig.from_dict(c.to_dict()) == c


def test_state_dict_names_and_frozen_embedding(spec_factory):
    draft = Eagle3LlamaDraft.from_target(DraftConfig(num_layers=2, draft_vocab_size=128), spec_factory())
    names = set(draft.state_dict())
    layer0 = {
        "layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight",
        "layers.0.self_attn.v_proj.weight", "layers.0.self_attn.o_proj.weight", "layers.0.hidden_norm.weight",
        "layers.0.input_layernorm.weight", "layers.0.post_attention_layernorm.weight",
        "layers.0.mlp.gate_proj.weight", "layers.0.mlp.up_proj.weight", "layers.0.mlp.down_proj.weight",
    }
    assert layer0 <= names
    assert {"fc.weight", "norm.weight", "lm_head.weight", "d2t", "t2d", "embed_tokens.weight"} <= names
    assert "layers.1.hidden_norm.weight" not in names
    assert draft.layers[1].self_attn.q_proj.weight.shape == (64, 64)
    assert not draft.embed_tokens.weight.requires_grad
    trainable = draft.trainable_parameters()
    assert all(p is not draft.embed_tokens.weight for p in trainable)
    assert len(trainable) == sum(1 for _ in draft.parameters()) - 1


def test_rope_theta_and_scaling_come_from_target(spec_factory):
    default = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=128), spec_factory())
    big_theta = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=128),
                                             spec_factory(rope_theta=500000.0))
    exponents = torch.arange(0, 16, 2).double() / 16
    torch.testing.assert_close(default.rotary_emb.inv_freq.double(), 1 / 10000.0**exponents,
                               rtol=1e-6, atol=0)
    torch.testing.assert_close(big_theta.rotary_emb.inv_freq.double(), 1 / 500000.0**exponents,
                               rtol=1e-6, atol=0)
    assert big_theta.config.rope_theta == 500000.0
    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    scaled = Eagle3LlamaDraft.from_target(
        DraftConfig(draft_vocab_size=128), spec_factory(rope_theta=500000.0, rope_scaling=scaling)
    )
    expected, _ = ROPE_INIT_FUNCTIONS["llama3"](
        LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16, max_position_embeddings=256,
                    rope_parameters={**scaling, "rope_theta": 500000.0}), None
    )
    torch.testing.assert_close(scaled.rotary_emb.inv_freq, expected.float())
    assert not torch.allclose(scaled.rotary_emb.inv_freq, big_theta.rotary_emb.inv_freq)
    with pytest.raises(ValueError, match="dynamic"):
        Eagle3LlamaDraft.from_target(
            DraftConfig(), spec_factory(rope_scaling={"rope_type": "dynamic", "factor": 2.0})
        )


def test_mrope_matches_qwen2_5_vl_rotary(spec_factory):
    from transformers import Qwen2_5_VLTextConfig
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLRotaryEmbedding

    section = [2, 3, 3]  # head_dim 16 -> 8 frequencies
    scaling = {"rope_type": "default", "mrope_section": section}
    draft = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=128),
                                         spec_factory(rope_scaling=scaling))
    hf = Qwen2_5_VLRotaryEmbedding(Qwen2_5_VLTextConfig(
        hidden_size=64, num_attention_heads=4, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}))
    positions = torch.stack([torch.arange(10).repeat(2, 1), torch.randint(0, 9, (2, 10)),
                             torch.randint(0, 9, (2, 10))])
    cos, sin = draft.rotary_emb(positions, torch.float32)
    ref_cos, ref_sin = hf(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)
    text = torch.arange(10).repeat(2, 1)  # equal components: plain RoPE over (B, T) positions
    torch.testing.assert_close(draft.rotary_emb(text.expand(3, -1, -1), torch.float32),
                               draft.rotary_emb(text, torch.float32))
    plain = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=128), spec_factory())
    with pytest.raises(ValueError, match="mrope_section"):
        plain.rotary_emb(positions, torch.float32)
    with pytest.raises(ValueError, match="sum to head_dim/2"):
        Eagle3LlamaDraft.from_target(DraftConfig(), spec_factory(rope_scaling={"mrope_section": [2, 2, 2]}))


def test_config_errors(spec_factory):
    with pytest.raises(ValueError, match="hidden_size"):
        Eagle3LlamaDraft.from_target(DraftConfig(hidden_size=32), spec_factory())
    with pytest.raises(ValueError, match="num_key_value_heads"):
        Eagle3LlamaDraft.from_target(DraftConfig(num_attention_heads=4, num_key_value_heads=3),
                                     spec_factory())
    with pytest.raises(ValueError, match="attention"):
        Eagle3LlamaDraft.from_target(DraftConfig(attention="flash"), spec_factory())


def test_set_draft_vocab_validates(draft_factory):
    draft = draft_factory()
    d2t, t2d = draft.d2t.clone(), draft.t2d.clone()
    bad = t2d.clone()
    bad[(~t2d).nonzero()[0]] = True
    with pytest.raises(ValueError, match="disagree"):
        draft.set_draft_vocab(d2t, bad)
    with pytest.raises(ValueError, match="shapes"):
        draft.set_draft_vocab(d2t[:-1], t2d)
    ids = draft.draft_token_ids()
    assert bool(t2d[ids].all()) and bool((ids[1:] > ids[:-1]).all())


@pytest.mark.parametrize("num_layers", [1, 2])
def test_step_inference_reproduces_ttt_logits(draft_factory, batch_factory, num_layers):
    draft = draft_factory(num_layers=num_layers)
    steps, length = 4, 20
    batch = batch_factory([[length], [length]], length, seed=3)
    aux, ids, pos = batch["aux_hidden_states"], batch["input_ids"], batch["position_ids"] + 5
    with torch.no_grad():
        ttt_logits = [
            logits
            for (logits,) in run_ttt_steps(
                draft, aux, draft.embed(ids), pos, batch["document_ids"], steps,
                lambda step, hidden: (draft.compute_logits(hidden),),
            )
        ]
        for t in (0, 9, 15):
            cache = draft.new_cache()
            logits, hidden = draft.step(aux[:, : t + 1], ids[:, 1 : t + 2], pos[:, : t + 1], cache)
            torch.testing.assert_close(logits, ttt_logits[0][:, : t + 1], rtol=1e-9, atol=1e-10)
            hidden = hidden[:, -1:]
            for j in range(1, steps):  # teacher-forced tokens, as in TTT
                logits, hidden = draft.step(hidden, ids[:, t + 1 + j : t + 2 + j],
                                            pos[:, t : t + 1] + j, cache)
                torch.testing.assert_close(logits[:, 0], ttt_logits[j][:, t], rtol=1e-9, atol=1e-10)
            assert len(cache) == t + steps
            # drop the drafted tokens, then append accepted target positions t+1..t+3 from their aux states
            cache.crop(t + 1)
            new_embeds = draft.embed(ids[:, t + 2 : t + 5])
            logits, _ = draft.extend(aux[:, t + 1 : t + 4], new_embeds, pos[:, t + 1 : t + 4], cache)
            torch.testing.assert_close(logits, ttt_logits[0][:, t + 1 : t + 4], rtol=1e-9, atol=1e-10)
            assert len(cache) == t + 4
