"""Interleaved M-RoPE (Qwen3-VL) in the draft's rotary, against HF's Qwen3-VL text rotary."""
import pytest
import torch

from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft, mrope_components


def qwen3_vl_rotary(head_dim, section):
    from transformers import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextRotaryEmbedding

    heads = 4
    return Qwen3VLTextRotaryEmbedding(Qwen3VLTextConfig(
        hidden_size=heads * head_dim, num_attention_heads=heads, head_dim=head_dim,
        max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_section": section,
                         "mrope_interleaved": True}))


@pytest.mark.parametrize("head_dim,section", [(16, [2, 3, 3]), (128, [24, 20, 20])])
def test_interleaved_mrope_matches_qwen3_vl_rotary(spec_factory, head_dim, section):
    scaling = {"rope_type": "default", "mrope_section": section, "mrope_interleaved": True}
    spec = spec_factory(rope_scaling=scaling, head_dim=head_dim, hidden_size=4 * head_dim,
                        rope_theta=5000000.0)
    draft = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=128), spec)
    g = torch.Generator().manual_seed(0)
    positions = torch.stack([torch.arange(12).repeat(2, 1), torch.randint(0, 30, (2, 12), generator=g),
                             torch.randint(0, 30, (2, 12), generator=g)])
    cos, sin = draft.rotary_emb(positions, torch.float32)
    ref_cos, ref_sin = qwen3_vl_rotary(head_dim, section)(torch.zeros(1, dtype=torch.float32), positions)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)
    # the chunked (Qwen2.5-VL) layout rotates the same positions differently
    chunked = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=128), spec_factory(
        rope_scaling={"rope_type": "default", "mrope_section": section}, head_dim=head_dim,
        hidden_size=4 * head_dim, rope_theta=5000000.0))
    assert not torch.allclose(chunked.rotary_emb(positions, torch.float32)[0], cos)
    text = torch.arange(12).repeat(2, 1)  # equal components: plain RoPE, as after the last image
    torch.testing.assert_close(draft.rotary_emb(text.expand(3, -1, -1), torch.float32),
                               draft.rotary_emb(text, torch.float32))


def test_interleaved_components_and_errors(spec_factory):
    # vLLM's apply_interleaved_rope: h where j % 3 == 1 and j < 3*s1, w where j % 3 == 2 and j < 3*s2, else t
    assert mrope_components([24, 20, 20], True)[:9].tolist() == [0, 1, 2] * 3
    assert mrope_components([24, 20, 20], True)[60:].tolist() == [0, 0, 0, 0]
    assert mrope_components([24, 20, 20], True).bincount().tolist() == [24, 20, 20]
    assert mrope_components([2, 3, 3], False).tolist() == [0, 0, 1, 1, 1, 2, 2, 2]
    with pytest.raises(ValueError, match="3-part mrope_section"):
        mrope_components([4, 4], True)
    with pytest.raises(ValueError, match="sum to head_dim/2"):
        Eagle3LlamaDraft.from_target(DraftConfig(), spec_factory(
            rope_scaling={"mrope_section": [2, 2, 2], "mrope_interleaved": True}))
