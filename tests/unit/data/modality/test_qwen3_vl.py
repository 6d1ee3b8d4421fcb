"""Qwen3-VL through the vision adapter: placeholders, DeepStack in the aux states, interleaved M-RoPE,
export."""
import json

import pytest
import torch

from data.sources import DataConfig
from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft
from models.registry import MODALITIES, TARGETS
from models.targets.base import TargetConfig
from tools.export.base import export

DRAFT_IDS = torch.tensor([1, 5, 200])


@pytest.fixture(scope="module")
def qwen3_vl(qwen3_vl_target_dir):
    path, tokenizer, processor = qwen3_vl_target_dir
    target = TARGETS.get("hf").load(TargetConfig(path=path, dtype="float32", aux_layer_ids=[1, 2, 3],
                                                 modality="vision"))
    return target, MODALITIES.get("vision")(None, tokenizer, processor, data=DataConfig(max_length=256))


def image_file(tmp_path, height, width, name="img.png"):
    import numpy as np
    from PIL import Image

    path = tmp_path / name
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(path)
    return str(path)


def test_placeholders_follow_the_image_processor(qwen3_vl, tmp_path):
    target, adapter = qwen3_vl
    config = target.module.config
    paths = [image_file(tmp_path, 64, 96, "a.png"), image_file(tmp_path, 128, 64, "b.png")]
    enc = adapter.encode({"id": "q", "images": paths, "messages": [
        {"role": "user", "content": "Compare <image> and <image>."},
        {"role": "assistant", "content": "Same."}]})
    grids = adapter.processor(images=[adapter_image(p) for p in paths], return_tensors="pt")["image_grid_thw"]
    assert grids.tolist() == [[1, 4, 6], [1, 8, 4]] and torch.equal(enc["image_grid_thw"], grids)
    ids = enc["input_ids"]
    starts = [i for i, t in enumerate(ids) if t == config.vision_start_token_id]
    blocks = [ids[s + 1:ids.index(config.vision_end_token_id, s)] for s in starts]
    assert [len(b) for b in blocks] == [6, 8]  # t*h*w / merge^2, each block only <|image_pad|>
    assert all(t == config.image_token_id for b in blocks for t in b)


def adapter_image(path):
    from data.modality.vision import open_image

    return open_image(path, "q")


def test_aux_states_carry_deepstack_and_positions_interleave(qwen3_vl, tmp_path):
    target, adapter = qwen3_vl
    assert target.spec.rope_scaling == {"rope_type": "default", "mrope_section": [2, 3, 3],
                                        "mrope_interleaved": True}
    enc = adapter.encode({"id": "d", "images": [image_file(tmp_path, 64, 96)], "messages": [
        {"role": "user", "content": "What is <image> here?"}, {"role": "assistant", "content": "A cat."}]})
    batch = adapter.collate([enc])
    out = target(batch, DRAFT_IDS)
    ids = batch["input_ids"]
    is_image = ids[0] == target.module.config.image_token_id
    module = target.module
    ref = module(input_ids=ids, pixel_values=batch["pixel_values"], image_grid_thw=batch["image_grid_thw"],
                 mm_token_type_ids=is_image.int()[None], output_hidden_states=True)
    torch.testing.assert_close(out.teacher_logits, ref.logits.float()[..., DRAFT_IDS])
    # vLLM (qwen3_vl.py Qwen3LLMModel) records aux layer i after adding DeepStack level i-1 at the image
    # positions; HF's hidden_states[i] is layer i-1's output before it.
    deepstack = module.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"],
                                                return_dict=True).deepstack_features
    hidden = module.config.text_config.hidden_size
    for slot, layer in enumerate((1, 2, 3)):
        expected = ref.hidden_states[layer].clone()
        if layer - 1 < len(deepstack):
            expected[0, is_image] += torch.cat(deepstack[layer - 1])
        torch.testing.assert_close(out.aux_hidden_states[..., slot * hidden:(slot + 1) * hidden], expected)
    assert out.inputs_embeds is None and out.position_ids.shape == (3, 1, ids.shape[1])
    assert not torch.equal(out.position_ids[1, 0, is_image], out.position_ids[2, 0, is_image])


def test_vllm_export_is_eagle3_qwen3vl_with_interleaved_mrope(qwen3_vl, tmp_path):
    target, _ = qwen3_vl
    draft = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=64), target.spec)
    draft.load_embedding(target.embed_tokens_weight())
    export(draft, tmp_path / "vllm", "vllm", target=target.spec, dtype="float32")
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    assert config["architectures"] == ["Eagle3Qwen3vlForCausalLM"]  # vLLM registry: llama_eagle3
    assert config["rope_scaling"] == {"rope_type": "default", "mrope_section": [2, 3, 3],
                                      "mrope_interleaved": True}
    assert config["eagle_aux_hidden_state_layer_ids"] == [1, 2, 3]
