"""Exports of the new drafts: DFlash in the layout vLLM's qwen3_dflash loads (names, shapes, config keys, mask
embedding file, reload check, Aerie round trip), EAGLE 3.1 switches under the keys vLLM reads; the composed
configs of draft=dflash and draft=eagle3_1."""
import json

import pytest
import torch
from safetensors.torch import load_file

from data.vocab import build_draft_vocab
from models.draft.dflash import DFlashConfig, DFlashDraft
from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft
from models.draft.io import save_aerie_draft
from tools.export.base import export, load_export
from tools.export.dflash import MASK_EMBEDDING_NAME, from_vllm_files, probe_block_logits
from trainer.checkpoint import load_draft

TARGET = {"name_or_path": "tiny", "model_type": "llama", "architectures": ["LlamaForCausalLM"]}


@pytest.fixture
def spec_factory():
    """A TargetSpec stand-in: hidden 64, 4/2 heads of 16, vocab 512, aux layers [2, 4, 5]."""
    from types import SimpleNamespace

    return lambda: SimpleNamespace(
        name_or_path="tiny", model_type="llama", architectures=["LlamaForCausalLM"],
        num_layers=8, hidden_size=64, intermediate_size=128, vocab_size=512, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=256, aux_layer_ids=[2, 4, 5])


def _vocab(draft, spec, size):
    draft.load_embedding(torch.randn(spec.vocab_size, spec.hidden_size))
    draft.set_draft_vocab(*build_draft_vocab(torch.randint(0, 1000, (spec.vocab_size,)), size))
    with torch.no_grad():
        draft.norm.weight.uniform_(0.5, 1.5)
    return draft


@pytest.mark.parametrize("draft_vocab", [128, 512], ids=["draft-vocab", "full-vocab"])
def test_dflash_vllm_export(tmp_path, spec_factory, draft_vocab):
    spec = spec_factory()
    torch.manual_seed(0)
    draft = _vocab(DFlashDraft.from_target(DFlashConfig(draft_vocab_size=draft_vocab, block_size=4), spec),
                   spec, draft_vocab)
    with torch.no_grad():
        draft.mask_embedding.normal_()
    out = export(draft, tmp_path / "vllm", "vllm", target=TARGET, dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["DFlashDraftModel"] and config["model_type"] == "qwen3"
    assert config["dflash_config"] == {"mask_token_id": 511, "block_size": 4, "target_layer_ids": [1, 3, 4]}
    assert (config["vocab_size"], config["draft_vocab_size"],
            config["num_hidden_layers"]) == (512, draft_vocab, 2)
    tensors = load_file(str(out / "model.safetensors"))
    assert not any(n.startswith(("model.", "embed_tokens", "mask")) or n == "t2d" for n in tensors)
    assert (tensors["layers.1.self_attn.k_norm.weight"].shape == (16,)
            and tensors["fc.weight"].shape == (64, 192))
    assert ("d2t" in tensors) == (draft_vocab < 512)
    mask = torch.load(out / MASK_EMBEDDING_NAME)
    assert mask["mask_token_id"] == 511 and torch.equal(mask["embedding"], draft.mask_embedding.detach())
    rebuilt = from_vllm_files(config, tensors, mask, draft.embed_tokens.weight.detach())
    torch.testing.assert_close(probe_block_logits(rebuilt), probe_block_logits(draft.eval()))
    with pytest.raises(ValueError, match="exports only to vllm"):
        export(draft, tmp_path / "sglang", "sglang", target=TARGET)


def test_dflash_aerie_round_trip(tmp_path, spec_factory):
    spec = spec_factory()
    draft = _vocab(DFlashDraft.from_target(DFlashConfig(draft_vocab_size=128), spec), spec, 128)
    with torch.no_grad():
        draft.mask_embedding.normal_()
    save_aerie_draft(draft, tmp_path / "final", metadata={"target": "tiny"})
    loaded = load_draft(tmp_path / "final", embed_weight=draft.embed_tokens.weight.detach())
    assert isinstance(loaded, DFlashDraft) and loaded.config == draft.config
    # not reset to the mask token's row
    torch.testing.assert_close(loaded.mask_embedding, draft.mask_embedding)
    torch.testing.assert_close(probe_block_logits(loaded), probe_block_logits(draft.eval()))


def test_eagle3_1_switches_exported_under_vllm_keys(tmp_path, spec_factory):
    spec = spec_factory()
    switches = dict(norm_before_fc=True, fc_norm=True, norm_output=True)
    draft = _vocab(Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=128, **switches), spec),
                   spec, 128)
    with torch.no_grad():
        draft.input_norm.weight.uniform_(0.5, 1.5)
    for fmt in ("vllm", "speculators"):
        out = export(draft, tmp_path / fmt, fmt, target=TARGET, dtype="float32")
        config = json.loads((out / "config.json").read_text())
        assert {k: config[k] for k in switches} == switches
        tensors = load_file(str(out / "model.safetensors"))
        assert tensors["input_norm.weight"].shape == (192,) and tensors["fc_norm.2.weight"].shape == (64,)
        assert load_export(out, fmt, draft.embed_tokens.weight.detach()).config == draft.config
    with pytest.raises(ValueError, match="EAGLE 3.1"):
        export(draft, tmp_path / "sglang", "sglang", target=TARGET)


def test_draft_options_compose(hydra_restore):
    from hydra import compose, initialize_config_dir

    from tests.helpers import REPO
    from tools.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        dflash = compose("train", overrides=["draft=dflash", "draft.block_size=4"])
        eagle3_1 = compose("train", overrides=["draft=eagle3_1"])
        default = compose("train")
        with pytest.raises(Exception, match="ttt_steps"):
            compose("train", overrides=["draft=dflash", "draft.ttt_steps=3"])
    assert (dflash.draft.arch, dflash.draft.block_size, dflash.draft.num_layers) == ("dflash", 4, 2)
    assert (eagle3_1.draft.fc_norm, eagle3_1.draft.norm_output,
            eagle3_1.draft.norm_before_fc) == (True, True, False)
    # the default is EAGLE 3.1 (README "Choosing a draft": bench/drafts.py, bench/objective.py)
    assert default.draft.arch == "eagle3_llama" and default.draft.fc_norm and default.draft.norm_output
