"""DFlash draft files: Aerie's own format (read back) and the export vLLM serves as `method: "dflash"`.

vLLM export (checked against vLLM 0.32 qwen3_dflash.py, v1/spec_decode/dflash.py and eagle3_utils.py):
- config.json: `architectures: ["DFlashDraftModel"]`, `model_type: "qwen3"` with the Qwen3 layer fields, the
  target's vocab_size, draft_vocab_size, target_hidden_size, and
  `dflash_config: {mask_token_id, target_layer_ids, block_size}`.  target_layer_ids count outputs of layers
  (vLLM adds 1), so they are Aerie's aux ids - 1.
- model.safetensors without a `model.` prefix: layers.N.{self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm,
  mlp.{gate,up,down}_proj, input_layernorm, post_attention_layernorm}.weight, fc.weight, hidden_norm.weight,
  norm.weight, lm_head.weight (over the draft vocabulary) and d2t when the draft vocabulary is smaller than
  the target's.  No embed_tokens: vLLM shares the target's.
- mask_embedding.pt: {"mask_token_id", "embedding"}: vLLM substitutes it for embed_tokens[mask_token_id] at
  the masked slots (a mask_embedding tensor in the safetensors would be dropped).
Before writing, a draft rebuilt from these files alone must reproduce the source draft's block logits.
"""
from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Dict, Optional, Union

import torch
from torch import Tensor

from data.io import read_json, safetensors_bytes, write_dir_atomically
from models.draft.dflash import DFlashDraft, DFlashModelConfig
from models.draft.io import CONFIG_NAME, WEIGHTS_NAME, build_draft, draft_state
from tools.export.validate import (
    check_against_target,
    check_reload,
    check_trained_settings,
    name_and_shape_problems,
    safetensors_shapes,
)

MASK_EMBEDDING_NAME = "mask_embedding.pt"
VLLM_METHOD = "dflash"  # vLLM's speculative_config method for these exports


def vllm_config(cfg: DFlashModelConfig, target: dict, dtype: str) -> dict:
    rope = {"rope_type": "default", **(cfg.rope_scaling or {}), "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["DFlashDraftModel"], "model_type": "qwen3",
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim, "num_hidden_layers": cfg.num_layers, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "rope_parameters": rope,
        "max_position_embeddings": cfg.max_position_embeddings, "vocab_size": cfg.vocab_size,
        "draft_vocab_size": cfg.draft_vocab_size, "target_hidden_size": cfg.target_hidden_size,
        "hidden_act": "silu", "attention_bias": False, "tie_word_embeddings": False, "torch_dtype": dtype,
        "dflash_config": {"mask_token_id": cfg.mask_token_id, "block_size": cfg.block_size,
                          "target_layer_ids": [i - 1 for i in cfg.aux_layer_ids]},
        "aerie": {"target": target.get("name_or_path", ""), "aux_layer_ids": list(cfg.aux_layer_ids)},
    }


def config_from_vllm(exported: dict) -> DFlashModelConfig:
    try:
        dflash = exported["dflash_config"]
        aux = [i + 1 for i in dflash["target_layer_ids"]]
        return DFlashModelConfig(
            hidden_size=exported["hidden_size"], intermediate_size=exported["intermediate_size"],
            num_attention_heads=exported["num_attention_heads"],
            num_key_value_heads=exported["num_key_value_heads"], head_dim=exported["head_dim"],
            rms_norm_eps=exported["rms_norm_eps"], rope_theta=exported["rope_theta"],
            rope_scaling={k: v for k, v in exported["rope_parameters"].items()
                          if k not in ("rope_type", "rope_theta")} or None,
            max_position_embeddings=exported["max_position_embeddings"], vocab_size=exported["vocab_size"],
            draft_vocab_size=exported["draft_vocab_size"], target_hidden_size=exported["target_hidden_size"],
            num_aux_layers=len(aux), num_layers=exported["num_hidden_layers"],
            block_size=dflash["block_size"], mask_token_id=dflash["mask_token_id"], aux_layer_ids=aux)
    except KeyError as err:
        raise ValueError(f"DFlash config.json lacks key {err}") from None


def expected_tensors(cfg: DFlashModelConfig) -> Dict[str, tuple]:
    """{name: shape} of model.safetensors (what DFlashQwen3ForCausalLM.load_weights takes)."""
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    shapes = {"fc.weight": (h, cfg.num_aux_layers * cfg.target_hidden_size), "hidden_norm.weight": (h,),
              "norm.weight": (h,), "lm_head.weight": (cfg.draft_vocab_size, h)}
    for i in range(cfg.num_layers):
        shapes.update({f"layers.{i}.{name}": shape for name, shape in {
            "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
            "self_attn.v_proj.weight": (kv, h), "self_attn.o_proj.weight": (h, q),
            "self_attn.q_norm.weight": (cfg.head_dim,), "self_attn.k_norm.weight": (cfg.head_dim,),
            "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            "mlp.up_proj.weight": (cfg.intermediate_size, h),
            "mlp.down_proj.weight": (h, cfg.intermediate_size), "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,)}.items()})
    if cfg.draft_vocab_size < cfg.vocab_size:
        shapes["d2t"] = (cfg.draft_vocab_size,)
    return shapes


def from_vllm_files(config: dict, tensors: Dict[str, Tensor], mask: dict,
                    embed_weight: Tensor) -> DFlashDraft:
    """The draft vLLM would serve from these files (t2d rebuilt from d2t, mask embedding from its file)."""
    cfg = config_from_vllm(json.loads(json.dumps(config)))
    state = {k: v.float() if v.is_floating_point() else v for k, v in tensors.items()}
    d2t = state.pop("d2t", torch.zeros(cfg.draft_vocab_size, dtype=torch.long))
    t2d = torch.zeros(cfg.vocab_size, dtype=torch.bool)
    t2d[torch.arange(cfg.draft_vocab_size) + d2t] = True
    state.update(d2t=d2t, t2d=t2d, mask_embedding=mask["embedding"].float())
    if mask["mask_token_id"] != cfg.mask_token_id:
        raise ValueError(f"{MASK_EMBEDDING_NAME} mask_token_id {mask['mask_token_id']} "
                         f"!= {cfg.mask_token_id}")
    return build_draft("dflash", cfg, state, embed_weight, "dflash export")


def probe_block_logits(draft: DFlashDraft, seed: int = 0) -> Tensor:
    c, generator = draft.config, torch.Generator().manual_seed(seed)
    aux = torch.randn(1, 6, c.num_aux_layers * c.target_hidden_size, generator=generator)
    bonus = torch.randint(0, c.vocab_size, (1,), generator=generator)
    context = draft.new_context()
    with torch.no_grad():
        draft.extend_context(aux, torch.arange(6)[None], context)
        return draft.draft_block(bonus, torch.tensor([6]), c.block_size - 1, context)


def write(fmt: str, draft: DFlashDraft, out_dir: Union[str, Path], target: dict, num_speculative_tokens: int,
          dtype: str = "bfloat16", include_embed: bool = False) -> Path:
    """Write the vLLM export of a DFlash draft (config.json, model.safetensors, mask_embedding.pt) atomically.

    num_speculative_tokens is the engine's setting (below draft.block_size); vLLM shares the target's
    embedding, so include_embed writes nothing more."""
    from tools.export.base import EXPORT_DTYPES

    cfg, torch_dtype = draft.config, EXPORT_DTYPES[dtype]
    state = {n: (t.to(torch_dtype) if t.is_floating_point() else t).cpu()
             for n, t in draft_state(draft).items()}
    mask = {"mask_token_id": cfg.mask_token_id, "embedding": state.pop("mask_embedding").contiguous()}
    state.pop("t2d")
    if cfg.draft_vocab_size == cfg.vocab_size:
        state.pop("d2t")  # vLLM builds no draft_id_to_target_id then, and would refuse one
    expected = expected_tensors(cfg)
    wrong = sorted(set(expected) ^ set(state)) + [n for n in expected if n in state
                                                   and tuple(state[n].shape) != expected[n]]
    if wrong:
        raise ValueError(f"vllm DFlash export refused: names or shapes differ from the loader's "
                         f"at {wrong[:5]}")
    config = vllm_config(cfg, target, dtype)
    embed = draft.embed_tokens.weight.detach().float().cpu()
    # reference: the source draft with its weights rounded to the export dtype, computed in float32
    rounded = {n: (t.to(torch_dtype).float() if t.is_floating_point() else t)
               for n, t in draft_state(draft).items()}
    reference = build_draft("dflash", cfg, rounded, embed, "dflash draft")
    rebuilt = from_vllm_files(json.loads(json.dumps(config)), state, mask, embed)
    check_reload("vllm DFlash export", probe_block_logits(reference), probe_block_logits(rebuilt))
    buffer = io.BytesIO()
    torch.save(mask, buffer)
    files = {"config.json": json.dumps(config, indent=2).encode(), MASK_EMBEDDING_NAME: buffer.getvalue(),
             "model.safetensors": safetensors_bytes(state, metadata={"format": "pt"})}
    return write_dir_atomically(out_dir, files)


def detect(raw: dict) -> Optional[str]:
    """"vllm" for a DFlash export's config.json, None for anything else."""
    return "vllm" if "DFlashDraftModel" in (raw.get("architectures") or []) else None


def load(path: Path, fmt: str, embed_weight: Optional[Tensor] = None) -> DFlashDraft:
    """The draft vLLM would serve from an export dir."""
    from safetensors.torch import load_file

    config = read_json(path / CONFIG_NAME)
    mask = torch.load(path / MASK_EMBEDDING_NAME, weights_only=True)
    return from_vllm_files(config, load_file(str(path / WEIGHTS_NAME)), mask, embed_weight)


def validate(path: Path, fmt: str, target=None, draft_config: Optional[DFlashModelConfig] = None) -> None:
    """A DFlash export on disk: names and shapes, the mask embedding file, trained aux ids, the target's
    sizes."""
    raw = read_json(path / CONFIG_NAME)
    cfg = config_from_vllm(raw)
    problems = name_and_shape_problems(expected_tensors(cfg), safetensors_shapes(path / WEIGHTS_NAME))
    if problems or not (path / MASK_EMBEDDING_NAME).is_file():
        raise ValueError(f"{path}: vllm DFlash export refused: {problems or f'no {MASK_EMBEDDING_NAME}'}")
    check_trained_settings(path, cfg, raw.get("aerie") or {}, draft_config)
    if target is not None:
        check_against_target(path, cfg, target)
