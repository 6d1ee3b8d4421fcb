"""Aerie draft format, DeepSpeed checkpoint loading and the vLLM / SGLang / speculators exports."""
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from models.draft import io as draft_io
from models.draft.eagle3 import Eagle3LlamaDraft, Eagle3ModelConfig
from models.targets import meta
from tests.helpers import end_process_group
from tools.export import base as ex
from tools.export import eagle3
from tools.export.base import EXPORTS

H, INTER, HEADS, KV, HEAD_DIM, V, VD = 64, 128, 4, 2, 16, 512, 128
TARGET = {"name_or_path": "tiny/llama-8l", "model_type": "llama", "architectures": ["LlamaForCausalLM"]}


def make_config(num_layers=1, norm_before_residual=False, aux=(2, 4, 5)):
    return Eagle3ModelConfig(hidden_size=H, intermediate_size=INTER, num_attention_heads=HEADS,
                             num_key_value_heads=KV, head_dim=HEAD_DIM, rms_norm_eps=1e-6, rope_theta=5e5,
                             rope_scaling=None, max_position_embeddings=256, vocab_size=V,
                             draft_vocab_size=VD, target_hidden_size=H, num_aux_layers=len(aux),
                             num_layers=num_layers, norm_before_residual=norm_before_residual,
                             aux_layer_ids=list(aux))


def make_draft(seed=0, **kwargs):
    torch.manual_seed(seed)
    draft = Eagle3LlamaDraft(make_config(**kwargs))
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn_like(p))  # not all-ones, so swapped norms would show
    ids = torch.sort(torch.randperm(V)[:VD]).values
    t2d = torch.zeros(V, dtype=torch.bool)
    t2d[ids] = True
    draft.set_draft_vocab(ids - torch.arange(VD), t2d)
    draft.load_embedding(torch.randn(V, H))
    return draft.eval()


# ---- engine expectations, written independently of tools/export/base.py ------------------------------------
def engine_layer(prefix, first):
    size_in = 2 * H if first else H
    names = {"self_attn.q_proj.weight": (HEADS * HEAD_DIM, size_in),
             "self_attn.k_proj.weight": (KV * HEAD_DIM, size_in),
             "self_attn.v_proj.weight": (KV * HEAD_DIM, size_in),
             "self_attn.o_proj.weight": (H, HEADS * HEAD_DIM), "mlp.gate_proj.weight": (INTER, H),
             "mlp.up_proj.weight": (INTER, H), "mlp.down_proj.weight": (H, INTER),
             "input_layernorm.weight": (H,), "post_attention_layernorm.weight": (H,)}
    if first:
        names["hidden_norm.weight"] = (H,)
    return {prefix + k: v for k, v in names.items()}


def engine_expects(fmt, num_layers=1, embed=False):
    # vLLM: midlayer.* renamed to layers.0.* (single layer), layers.N.* otherwise; SGLang: midlayer.* only;
    # speculators: layers.N.*.  fc takes 3 aux states of the target.
    if fmt == "sglang" or (fmt == "vllm" and num_layers == 1):
        prefixes = ["midlayer."]
    else:
        prefixes = [f"layers.{i}." for i in range(num_layers)]
    out = {}
    for i, prefix in enumerate(prefixes):
        out.update(engine_layer(prefix, i == 0))
    out.update({"fc.weight": (H, 3 * H), "norm.weight": (H,), "lm_head.weight": (VD, H),
                "d2t": (VD,), "t2d": (V,)})
    if embed:
        out["embed_tokens.weight"] = (V, H)
    return out


def logits_of(draft, seed=1):
    g = torch.Generator().manual_seed(seed)
    aux = torch.randn(1, 5, 3 * H, generator=g)
    ids = torch.randint(0, V, (1, 6), generator=g)
    cache = draft.new_cache()
    with torch.no_grad():
        logits, hidden = draft.extend(aux, ids[:, :5], torch.arange(5)[None], cache)
        step, _ = draft.step(hidden[:, -1:], ids[:, 5:], torch.tensor([[5]]), cache, is_aux=False)
    return torch.cat([logits, step], 1)


@pytest.mark.parametrize("fmt,num_layers", [("vllm", 1), ("vllm", 2), ("sglang", 1), ("speculators", 1),
                                            ("speculators", 2)])
def test_export_round_trip(tmp_path, fmt, num_layers):
    draft = make_draft(num_layers=num_layers)
    out = EXPORTS.get(fmt)(draft, tmp_path / "out", target=TARGET, num_speculative_tokens=5, dtype="float32")
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    tensors = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == engine_expects(fmt, num_layers)
    assert tensors["d2t"].dtype == torch.int64 and tensors["t2d"].dtype == torch.bool
    assert torch.equal(tensors["d2t"], draft.d2t)
    config = json.loads((out / "config.json").read_text())
    if fmt == "vllm":
        assert config["architectures"] == ["Eagle3LlamaForCausalLM"]
        assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5]
        assert (config["num_hidden_layers"], config["vocab_size"],
                config["draft_vocab_size"]) == (num_layers, V, VD)
        assert config["rope_theta"] == 5e5 and config["norm_before_residual"] is False
    elif fmt == "sglang":
        assert config["architectures"] == ["LlamaForCausalLMEagle3"]
        assert config["eagle_config"] == {"eagle_aux_hidden_state_layer_ids": [1, 3, 4],
                                          "use_aux_hidden_state": True}
        assert "eagle_aux_hidden_state_layer_ids" not in config
    else:
        assert (config["architectures"] == ["Eagle3Speculator"]
                and config["speculators_model_type"] == "eagle3")
        spec = config["speculators_config"]
        assert spec["algorithm"] == "eagle3" and spec["default_proposal_method"] == "greedy"
        assert spec["proposal_methods"] == [{"proposal_type": "greedy", "speculative_tokens": 5}]
        assert spec["verifier"] == {"name_or_path": "tiny/llama-8l", "architectures": ["LlamaForCausalLM"]}
        assert config["transformer_layer_config"]["num_hidden_layers"] == num_layers
        assert config["eagle_aux_hidden_state_layer_ids"] == [2, 4, 5] and config["target_hidden_size"] == H
    reloaded = ex.load_export(out, fmt, embed_weight=draft.embed_tokens.weight)
    assert torch.allclose(logits_of(reloaded), logits_of(draft), atol=1e-5)


def test_export_embed_and_bf16(tmp_path):
    draft = make_draft()
    out = ex.export(draft, tmp_path / "vllm", "vllm", target=TARGET, include_embed=True)
    tensors = load_file(str(out / "model.safetensors"))
    assert {k: tuple(v.shape) for k, v in tensors.items()} == engine_expects("vllm", embed=True)
    assert tensors["fc.weight"].dtype == torch.bfloat16
    assert torch.equal(tensors["embed_tokens.weight"].float(), draft.embed_tokens.weight.bfloat16().float())


def test_wrong_or_missing_tensor_is_refused(tmp_path, monkeypatch):
    cfg = make_config()
    good = {k: torch.zeros(s, dtype=torch.int64 if k == "d2t" else torch.bool if k == "t2d"
                           else torch.float32)
            for k, s in engine_expects("sglang").items()}
    eagle3.validate_export_tensors("sglang", cfg, good)
    for broken in ({k: v for k, v in good.items() if k != "midlayer.hidden_norm.weight"},
                   {**good, "layers.0.self_attn.q_proj.weight": good.pop("midlayer.self_attn.q_proj.weight")},
                   {**good, "fc.weight": torch.zeros(H, 2 * H)}):
        with pytest.raises(ValueError, match="sglang export refused"):
            eagle3.validate_export_tensors("sglang", cfg, broken)
    # the export itself runs the check before writing: a mapping that loses a tensor writes nothing
    original = eagle3.to_export_names
    monkeypatch.setattr(eagle3, "to_export_names",
                        lambda fmt, c, s: {k: v for k, v in original(fmt, c, s).items()
                                           if k != "norm.weight"})
    with pytest.raises(ValueError, match="missing \\['norm.weight'\\]"):
        ex.export(make_draft(), tmp_path / "bad", "vllm", target=TARGET)
    assert not (tmp_path / "bad").exists()


def test_reload_check_catches_swapped_weights(tmp_path, monkeypatch):
    original = eagle3.to_export_names

    def swap_norms(fmt, c, s):
        out = original(fmt, c, s)
        out["midlayer.input_layernorm.weight"], out["midlayer.hidden_norm.weight"] = (
            out["midlayer.hidden_norm.weight"], out["midlayer.input_layernorm.weight"])
        return out

    monkeypatch.setattr(eagle3, "to_export_names", swap_norms)
    with pytest.raises(ValueError, match="does not reproduce"):
        ex.export(make_draft(), tmp_path / "bad", "sglang", target=TARGET)
    assert not (tmp_path / "bad").exists()


def test_unservable_drafts_and_multimodal_names(tmp_path):
    with pytest.raises(ValueError, match="1-layer"):
        ex.export(make_draft(num_layers=2), tmp_path / "x", "sglang", target=TARGET)
    with pytest.raises(ValueError, match="norm_before_residual"):
        ex.export(make_draft(norm_before_residual=True), tmp_path / "x", "sglang", target=TARGET)
    with pytest.raises(ValueError, match="3 \\* target_hidden_size"):
        ex.export(make_draft(aux=(2, 4)), tmp_path / "x", "vllm", target=TARGET)
    vl = {"name_or_path": "Qwen/Qwen2.5-VL-7B-Instruct", "model_type": "qwen2_5_vl",
          "architectures": ["Qwen2_5_VLForConditionalGeneration"]}
    out = ex.export(make_draft(), tmp_path / "vl", "vllm", target=vl)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Eagle3Qwen2_5vlForCausalLM"]
    out = ex.export(make_draft(), tmp_path / "vl-sgl", "sglang", target=vl)
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLMEagle3"]
    with pytest.raises(ValueError, match="registers no Eagle3 draft"):
        ex.export(make_draft(), tmp_path / "x", "vllm", target={**vl, "model_type": "qwen2_audio"})
    assert not (tmp_path / "x").exists()


def test_aerie_format_round_trip_and_replace(tmp_path):
    draft = make_draft(num_layers=2, norm_before_residual=True)
    out = draft_io.save_aerie_draft(draft, tmp_path / "final", metadata={"step": 7, "target": "t"})
    config = json.loads((out / "config.json").read_text())
    assert config["aerie_format"] == 1 and config["architecture"] == "eagle3_llama"
    assert config["metadata"] == {"step": 7, "target": "t"} and config["aux_layer_ids"] == [2, 4, 5]
    names = set(load_file(str(out / "model.safetensors")))
    assert ("embed_tokens.weight" not in names
            and {"d2t", "t2d", "fc.weight", "layers.1.mlp.up_proj.weight"} <= names)
    loaded = draft_io.load_aerie_draft(out, embed_weight=draft.embed_tokens.weight)
    assert loaded.config == draft.config and torch.equal(loaded.t2d, draft.t2d)
    assert torch.allclose(logits_of(loaded), logits_of(draft), atol=1e-6)
    # a second save replaces the first and leaves no temporary dirs behind
    other = make_draft(seed=3, num_layers=2, norm_before_residual=True)
    draft_io.save_aerie_draft(other, tmp_path / "final")
    assert sorted(os.listdir(tmp_path)) == ["final"]
    reloaded = draft_io.load_aerie_draft(tmp_path / "final", embed_weight=other.embed_tokens.weight)
    assert torch.allclose(logits_of(reloaded), logits_of(other), atol=1e-6)
    with pytest.raises(ValueError, match="missing"):
        draft_io.save_aerie_draft(draft, tmp_path / "bad", state_dict={"fc.weight": draft.fc.weight})


class Container(torch.nn.Module):
    def __init__(self, draft):
        super().__init__()
        self.draft = draft


@pytest.mark.slow
def test_load_draft_from_deepspeed_checkpoint(tmp_path, monkeypatch):
    import deepspeed
    import transformers
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from trainer.checkpoint import write_manifest

    target_dir = tmp_path / "target"
    tconfig = transformers.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=INTER,
                                       num_hidden_layers=8, num_attention_heads=HEADS, num_key_value_heads=KV,
                                       head_dim=HEAD_DIM, max_position_embeddings=256, rope_theta=5e5)
    transformers.LlamaForCausalLM(tconfig).save_pretrained(str(target_dir))
    cfg = {"target": {"backend": "hf", "path": str(target_dir), "aux_layer_ids": None},
           "draft": {"arch": "eagle3_llama", "num_layers": 1, "draft_vocab_size": VD}}
    spec = meta.target_spec_from_config(cfg["target"])
    from models.draft.eagle3 import DraftConfig

    draft = Eagle3LlamaDraft.from_target(DraftConfig(num_layers=1, draft_vocab_size=VD), spec)
    reference = make_draft()  # same sizes and aux ids as the 8-layer target's defaults
    assert draft.config == reference.config
    draft.load_state_dict(reference.state_dict())

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29533", "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"}.items():
        monkeypatch.setenv(key, value)
    ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 2},
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
                 "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}
    root = tmp_path / "run" / "ckpt"
    try:
        engine, *_ = deepspeed.initialize(model=Container(draft),
                                          model_parameters=draft.trainable_parameters(), config=ds_config)
        engine.save_checkpoint(str(root), tag="step-3", exclude_frozen_parameters=True)
    finally:
        end_process_group()
    step_dir = root / "step-3"
    (step_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(cfg)))
    save_file({"d2t": reference.d2t.contiguous(), "t2d": reference.t2d.contiguous()},
              str(step_dir / "vocab.safetensors"))
    (step_dir / "trainer_state.json").write_text(json.dumps({"step": 3, "world_size": 1}))
    write_manifest(step_dir, 3)  # what CheckpointManager writes last; export refuses a step dir without it

    loaded = ex.load_draft(step_dir, embed_weight=reference.embed_tokens.weight)
    assert loaded.config == reference.config
    assert torch.equal(loaded.d2t, reference.d2t) and torch.equal(loaded.t2d, reference.t2d)
    assert torch.allclose(logits_of(loaded), logits_of(reference), atol=1e-5)
    out = ex.export(step_dir, tmp_path / "spec", "speculators", target=TARGET)
    assert set(load_file(str(out / "model.safetensors"))) == set(engine_expects("speculators"))
    with pytest.raises(ValueError, match="neither"):
        ex.load_draft(tmp_path)


def test_run_export_from_composed_config(tmp_path):
    from omegaconf import OmegaConf

    draft = make_draft()
    draft_io.save_aerie_draft(draft, tmp_path / "final", metadata={"target": "unused"})
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": V,
                                                                  "hidden_size": H}))
    cfg = OmegaConf.create({"export": dataclasses.asdict(ex.ExportConfig(
        format="sglang", draft=str(tmp_path / "final"), out_dir=str(tmp_path / "sgl"),
        num_speculative_tokens=4)), "target": {"path": str(tmp_path / "target")}})
    out = ex.run_export(cfg)
    config = json.loads((out / "config.json").read_text())
    assert config["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [1, 3, 4]
    assert config["aerie"] == {"num_speculative_tokens": 4, "target": "target",  # machine paths stay out
                               "aux_layer_ids": [2, 4, 5], "rope_theta": draft.config.rope_theta}
    reloaded = ex.load_export(out, "sglang", embed_weight=draft.embed_tokens.weight)
    assert torch.allclose(logits_of(reloaded), logits_of(draft), atol=0.05)  # bf16 export
