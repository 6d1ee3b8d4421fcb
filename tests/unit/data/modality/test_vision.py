"""Vision adapter + HFTargetModel on a tiny Qwen2.5-VL: merged embeddings, M-RoPE, packing, file errors."""
import pytest
import torch

from data.sources import DataConfig
from models.registry import MODALITIES, TARGETS
from models.targets.base import TargetConfig

DRAFT_IDS = torch.tensor([1, 5, 200])


def setup(vl_target_dir):
    path, tokenizer, processor = vl_target_dir
    target = TARGETS.get("hf").load(TargetConfig(path=path, dtype="float32", aux_layer_ids=[1, 2, 3],
                                                 modality="vision"))
    adapter = MODALITIES.get("vision")(None, tokenizer, processor, data=DataConfig(max_length=256))
    return target, adapter


def test_vision_forward_matches_hf_and_packs(vl_target_dir, png_path):
    target, adapter = setup(vl_target_dir)
    image_sample = {"id": "a", "images": [png_path], "messages": [
        {"role": "user", "content": "What is <image> here?"}, {"role": "assistant", "content": "A cat."}]}
    text_sample = {"id": "b",
                   "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    enc = [adapter.encode(image_sample), adapter.encode(text_sample)]
    image_id = target.module.config.image_token_id
    assert sum(t == image_id for t in enc[0]["input_ids"]) == 6  # 56x84 px -> 4x6 patches -> 2x3 merged
    assert all(m == 0 for t, m in zip(enc[0]["input_ids"], enc[0]["loss_mask"]) if t == image_id)
    assert sum(enc[0]["loss_mask"]) > 0

    single = adapter.collate(enc[:1])
    out = target(single, DRAFT_IDS)
    ids = single["input_ids"]
    ref = target.module(input_ids=ids, pixel_values=single["pixel_values"],
                        image_grid_thw=single["image_grid_thw"], mm_token_type_ids=(ids == image_id).int(),
                        output_hidden_states=True)
    torch.testing.assert_close(out.aux_hidden_states,
                               torch.cat([ref.hidden_states[i] for i in (1, 2, 3)], -1))
    torch.testing.assert_close(out.teacher_logits, ref.logits.float()[..., DRAFT_IDS])
    assert out.inputs_embeds is None  # the draft embeds the placeholder ids, as vLLM's proposer does
    assert out.position_ids.shape == (3, 1, ids.shape[1])
    assert not torch.equal(out.position_ids[1], out.position_ids[2])  # height/width differ on image tokens

    packed = adapter.collate(enc, packed=True, max_tokens=512)
    assert packed["input_ids"].shape[0] == 1
    out_packed = target(packed, DRAFT_IDS)
    n0 = len(enc[0]["input_ids"])
    torch.testing.assert_close(out_packed.aux_hidden_states[:, :n0], out.aux_hidden_states,
                               atol=1e-5, rtol=1e-5)
    alone = target(adapter.collate(enc[1:]), DRAFT_IDS)
    torch.testing.assert_close(out_packed.aux_hidden_states[:, n0:], alone.aux_hidden_states,
                               atol=1e-5, rtol=1e-5)
    assert torch.equal(out_packed.position_ids[:, :, n0:], alone.position_ids)


def test_missing_or_bad_image_names_sample_and_path(vl_target_dir, tmp_path):
    _, tokenizer, processor = vl_target_dir
    adapter = MODALITIES.get("vision")(None, tokenizer, processor)
    missing = str(tmp_path / "nope.png")
    with pytest.raises(ValueError, match=r"sample s1: cannot read image .*nope\.png"):
        adapter.encode({"id": "s1", "images": [missing], "messages": [{"role": "user", "content": "x"}]})
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"sample s2: cannot read image .*bad\.png"):
        adapter.encode({"id": "s2", "images": [str(bad)], "messages": [{"role": "user", "content": "x"}]})
