"""Eagle3 drafts in the three engines' layouts: vLLM, SGLang and speculators (config.json +
model.safetensors).

Before anything is written each export is checked twice: its tensor names and shapes must equal what the
engine's loader expects (`expected_tensors`; SGLang drops unknown or missing names silently), and a draft
rebuilt from the exported config and tensors alone (`load`) must reproduce the source draft's logits
(tools/export/validate.py).

Aux layer ids: vLLM / speculators store the input-to-layer ids top-level; SGLang stores output-of-layer ids
(vLLM id - 1) in eagle_config.  Checked against vLLM llama_eagle3.py / registry.py, SGLang llama_eagle3.py and
speculators' Eagle3SpeculatorConfig (2026).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from data.io import read_json, safetensors_bytes, write_dir_atomically
from models.draft.eagle3 import Eagle3LlamaDraft, Eagle3ModelConfig
from models.draft.io import CONFIG_NAME, WEIGHTS_NAME, build_draft, draft_state
from models.targets.base import from_sglang_layer_ids, to_sglang_layer_ids
from tools.export.validate import (
    check_against_target,
    check_reload,
    check_trained_settings,
    name_and_shape_problems,
    optional_embed,
    safetensors_shapes,
)

# target model_type -> Eagle3 draft architecture each engine registers for it (vLLM registry.py
# _SPECULATIVE_DECODING_MODELS; SGLang serves every Eagle3 draft as LlamaForCausalLMEagle3 and switches to
# M-RoPE itself when rope_scaling carries mrope_section).  None: the engine registers no Eagle3 draft for that
# target.
MULTIMODAL_ARCHITECTURES = {
    "vllm": {"qwen2_5_vl": "Eagle3Qwen2_5vlForCausalLM", "qwen3_vl": "Eagle3Qwen3vlForCausalLM",
             "qwen2_vl": None, "qwen2_audio": None,
             # speech targets vLLM 0.32 serves with an Eagle3 draft (SupportsEagle3 in qwen3_asr.py and
             # qwen3_omni_moe_thinker.py); the draft is the plain Llama Eagle3 head
             "qwen3_asr": "Eagle3LlamaForCausalLM", "qwen3_omni_moe": "Eagle3LlamaForCausalLM"},
    "sglang": {"qwen2_5_vl": "LlamaForCausalLMEagle3", "qwen3_vl": "LlamaForCausalLMEagle3",
               "qwen2_vl": "LlamaForCausalLMEagle3", "qwen2_audio": None},
}
VLLM_METHOD = "eagle3"  # vLLM's speculative_config method for these exports
TEXT_ARCHITECTURES = {"vllm": "Eagle3LlamaForCausalLM", "sglang": "LlamaForCausalLMEagle3",
                      "speculators": "Eagle3Speculator"}


# ---- what each engine expects ------------------------------------------------------------------------------
def _layer_tensors(cfg: Eagle3ModelConfig, prefix: str, first: bool) -> Dict[str, Tuple[int, ...]]:
    h, q, kv = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
    size_in = 2 * h if first else h
    shapes = {
        "self_attn.q_proj.weight": (q, size_in), "self_attn.k_proj.weight": (kv, size_in),
        "self_attn.v_proj.weight": (kv, size_in), "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (cfg.intermediate_size, h), "mlp.up_proj.weight": (cfg.intermediate_size, h),
        "mlp.down_proj.weight": (h, cfg.intermediate_size),
        "input_layernorm.weight": (h,), "post_attention_layernorm.weight": (h,),
    }
    if first:
        shapes["hidden_norm.weight"] = (h,)
    return {prefix + name: shape for name, shape in shapes.items()}


def _layer_prefix(fmt: str, cfg: Eagle3ModelConfig, index: int) -> str:
    single = cfg.num_layers == 1
    return "midlayer." if fmt == "sglang" or (fmt == "vllm" and single) else f"layers.{index}."


def check_servable(fmt: str, cfg: Eagle3ModelConfig) -> None:
    """ValueError when the engine cannot serve this draft as trained."""
    if fmt not in TEXT_ARCHITECTURES:
        raise ValueError(f"unknown export format {fmt!r}; available: {', '.join(sorted(TEXT_ARCHITECTURES))}")
    if fmt in ("vllm", "sglang") and cfg.num_aux_layers != 3:
        raise ValueError(f"{fmt} builds fc with 3 * target_hidden_size inputs; this draft has "
                         f"{cfg.num_aux_layers} aux layers ({cfg.aux_layer_ids})")
    if fmt == "sglang" and cfg.num_layers != 1:
        raise ValueError(f"SGLang's LlamaForCausalLMEagle3 serves 1-layer drafts only (older versions raise; "
                         f"newer ones drop the residual between extra layers); this draft has "
                         f"{cfg.num_layers}: export vllm")
    switches = [name for name in ("norm_before_fc", "fc_norm", "norm_output") if getattr(cfg, name)]
    if fmt == "sglang" and switches:
        raise ValueError(f"SGLang's LlamaForCausalLMEagle3 has no EAGLE 3.1 switches; this draft was trained "
                         f"with {', '.join(switches)}: export vllm or speculators")
    if fmt == "sglang" and cfg.norm_before_residual:
        raise ValueError("SGLang ignores norm_before_residual (always adds the un-normalised hidden); "
                         "this draft was trained with norm_before_residual=true: export vllm or speculators")


def expected_tensors(fmt: str, cfg: Eagle3ModelConfig,
                     include_embed: bool = False) -> Dict[str, Tuple[int, ...]]:
    """{tensor name: shape} the engine's loader takes for this draft config (nothing more, nothing less)."""
    check_servable(fmt, cfg)
    shapes: Dict[str, Tuple[int, ...]] = {}
    for index in range(cfg.num_layers):
        shapes.update(_layer_tensors(cfg, _layer_prefix(fmt, cfg, index), index == 0))
    if cfg.norm_before_fc:  # EAGLE 3.1 (vLLM llama_eagle3.py: input_norm, fc_norm.i)
        shapes["input_norm.weight"] = (cfg.num_aux_layers * cfg.target_hidden_size,)
    if cfg.fc_norm:
        shapes.update({f"fc_norm.{i}.weight": (cfg.target_hidden_size,) for i in range(cfg.num_aux_layers)})
    shapes.update({"fc.weight": (cfg.hidden_size, cfg.num_aux_layers * cfg.target_hidden_size),
                   "norm.weight": (cfg.hidden_size,),
                   "lm_head.weight": (cfg.draft_vocab_size, cfg.hidden_size), "d2t": (cfg.draft_vocab_size,),
                   "t2d": (cfg.vocab_size,)})
    if include_embed:
        shapes["embed_tokens.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def validate_export_tensors(fmt: str, cfg: Eagle3ModelConfig, tensors: Dict[str, Tensor],
                            include_embed: bool = False) -> None:
    problems = name_and_shape_problems(expected_tensors(fmt, cfg, include_embed),
                                        {n: tuple(t.shape) for n, t in tensors.items()})
    if problems:
        raise ValueError(f"{fmt} export refused: {problems}")
    if tensors["d2t"].dtype != torch.int64 or tensors["t2d"].dtype != torch.bool:
        raise ValueError(f"{fmt} export refused: d2t must be int64 and t2d bool, got {tensors['d2t'].dtype}, "
                         f"{tensors['t2d'].dtype}")


# ---- config.json of each engine ----------------------------------------------------------------------------
def _llama_fields(cfg: Eagle3ModelConfig, dtype: str) -> dict:
    return {"model_type": "llama", "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_attention_heads, "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim, "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
            "rope_scaling": cfg.rope_scaling, "max_position_embeddings": cfg.max_position_embeddings,
            "vocab_size": cfg.vocab_size, "num_hidden_layers": cfg.num_layers, "hidden_act": "silu",
            "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "torch_dtype": dtype}


def _architecture(fmt: str, target: dict) -> str:
    model_type = target.get("model_type") or ""
    table = MULTIMODAL_ARCHITECTURES.get(fmt, {})
    if model_type in table:
        if table[model_type] is None:
            raise ValueError(f"{fmt} registers no Eagle3 draft architecture for target model_type "
                             f"{model_type!r}; no export for it "
                             f"(see tools/export/eagle3.py MULTIMODAL_ARCHITECTURES)")
        return table[model_type]
    return TEXT_ARCHITECTURES[fmt]


def export_config(fmt: str, cfg: Eagle3ModelConfig, target: dict, num_speculative_tokens: int,
                  dtype: str) -> dict:
    """The config.json an engine reads for this draft."""
    check_servable(fmt, cfg)
    # what the draft was trained with (vLLM aux-id convention), so that an edited config.json is refused
    aerie = {"num_speculative_tokens": num_speculative_tokens, "target": target.get("name_or_path", ""),
             "aux_layer_ids": list(cfg.aux_layer_ids), "rope_theta": cfg.rope_theta}
    draft_fields = {"draft_vocab_size": cfg.draft_vocab_size, "target_hidden_size": cfg.target_hidden_size,
                    "norm_before_residual": cfg.norm_before_residual}
    if fmt != "sglang":  # EAGLE 3.1 keys vLLM and speculators read top-level
        draft_fields.update(norm_before_fc=cfg.norm_before_fc, fc_norm=cfg.fc_norm,
                            norm_output=cfg.norm_output)
    if fmt == "vllm":
        return {"architectures": [_architecture(fmt, target)], **_llama_fields(cfg, dtype), **draft_fields,
                "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids), "aerie": aerie}
    if fmt == "sglang":
        return {"architectures": [_architecture(fmt, target)], **_llama_fields(cfg, dtype), **draft_fields,
                "eagle_config": {"eagle_aux_hidden_state_layer_ids": to_sglang_layer_ids(cfg.aux_layer_ids),
                                 "use_aux_hidden_state": True}, "aerie": aerie}
    layer = {**_llama_fields(cfg, dtype), "architectures": ["LlamaForCausalLM"]}
    return {"architectures": [TEXT_ARCHITECTURES[fmt]], "speculators_model_type": "eagle3",
            "transformer_layer_config": layer,
            "speculators_config": {"algorithm": "eagle3", "default_proposal_method": "greedy",
                                   "proposal_methods": [{"proposal_type": "greedy",
                                                         "speculative_tokens": num_speculative_tokens}],
                                   "verifier": {"name_or_path": target.get("name_or_path", ""),
                                                "architectures": list(target.get("architectures") or [])}},
            **draft_fields, "eagle_aux_hidden_state_layer_ids": list(cfg.aux_layer_ids), "torch_dtype": dtype,
            "aerie": aerie}


def config_from_export(fmt: str, exported: dict) -> Eagle3ModelConfig:
    """Eagle3ModelConfig read back from an engine's config.json (the inverse of export_config)."""
    try:
        if fmt == "speculators":
            llama, aux = exported["transformer_layer_config"], exported["eagle_aux_hidden_state_layer_ids"]
        elif fmt == "sglang":
            llama, aux = exported, from_sglang_layer_ids(
                exported["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
        else:
            llama, aux = exported, exported["eagle_aux_hidden_state_layer_ids"]
        return Eagle3ModelConfig(
            hidden_size=llama["hidden_size"], intermediate_size=llama["intermediate_size"],
            num_attention_heads=llama["num_attention_heads"],
            num_key_value_heads=llama["num_key_value_heads"], head_dim=llama["head_dim"],
            rms_norm_eps=llama["rms_norm_eps"], rope_theta=llama["rope_theta"],
            rope_scaling=llama["rope_scaling"], max_position_embeddings=llama["max_position_embeddings"],
            vocab_size=llama["vocab_size"], draft_vocab_size=exported["draft_vocab_size"],
            target_hidden_size=exported["target_hidden_size"], num_aux_layers=len(aux),
            num_layers=llama["num_hidden_layers"],
            norm_before_residual=bool(exported["norm_before_residual"]), aux_layer_ids=list(aux),
            norm_before_fc=bool(exported.get("norm_before_fc", False)),
            fc_norm=bool(exported.get("fc_norm", False)),
            norm_output=bool(exported.get("norm_output", False)))
    except KeyError as err:
        raise ValueError(f"{fmt} config.json lacks key {err}") from None


# ---- tensor names ------------------------------------------------------------------------------------------
def to_export_names(fmt: str, cfg: Eagle3ModelConfig, state: Dict[str, Tensor]) -> Dict[str, Tensor]:
    out = {}
    for name, tensor in state.items():
        if name.startswith("layers."):
            index, rest = name[len("layers."):].split(".", 1)
            name = _layer_prefix(fmt, cfg, int(index)) + rest
        out[name] = tensor
    return out


def from_export_names(fmt: str, cfg: Eagle3ModelConfig, tensors: Dict[str, Tensor]) -> Dict[str, Tensor]:
    return {("layers.0." + name[len("midlayer."):] if name.startswith("midlayer.") else name): t
            for name, t in tensors.items()}


def load(path: Union[str, Path], fmt: str, embed_weight: Optional[Tensor] = None) -> Eagle3LlamaDraft:
    """Rebuild an Aerie draft from an engine export (config.json + model.safetensors) alone."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = config_from_export(fmt, read_json(path / CONFIG_NAME))
    state = from_export_names(fmt, cfg, load_file(str(path / WEIGHTS_NAME)))
    return build_draft("eagle3_llama", cfg, state, optional_embed(state, embed_weight), str(path))


def detect(raw: dict) -> Optional[str]:
    """The format of an export's config.json when it is an Eagle3 one (None otherwise)."""
    if raw.get("speculators_model_type") == "eagle3":
        return "speculators"
    architectures = set(raw.get("architectures") or [])
    if "eagle_config" in raw and architectures & {"LlamaForCausalLMEagle3"}:
        return "sglang"
    vllm_names = {TEXT_ARCHITECTURES["vllm"]} | {a for a in MULTIMODAL_ARCHITECTURES["vllm"].values() if a}
    return "vllm" if architectures & vllm_names else None


def validate(path: Path, fmt: str, target=None, draft_config: Optional[Eagle3ModelConfig] = None) -> None:
    """An Eagle3 export on disk: names and shapes, trained aux ids / rope_theta, and the target's sizes."""
    raw = read_json(path / CONFIG_NAME)
    cfg = config_from_export(fmt, raw)
    shapes = safetensors_shapes(path / WEIGHTS_NAME)
    problems = name_and_shape_problems(
        expected_tensors(fmt, cfg, include_embed="embed_tokens.weight" in shapes), shapes)
    if problems:
        raise ValueError(f"{path}: {fmt} export refused: {problems}")
    check_trained_settings(path, cfg, raw.get("aerie") or {}, draft_config)
    if target is not None:
        check_against_target(path, cfg, target)


def probe_chain_logits(draft: Eagle3LlamaDraft, seed: int = 0) -> Tensor:
    """Logits of a fixed random prefix and two chained steps: what the reload check compares."""
    generator = torch.Generator().manual_seed(seed)
    length, c = 6, draft.config
    aux = torch.randn(1, length, c.num_aux_layers * c.target_hidden_size, generator=generator)
    ids = torch.randint(0, c.vocab_size, (1, length + 2), generator=generator)
    positions = torch.arange(length)[None]
    cache = draft.new_cache()
    with torch.no_grad():
        logits, hidden = draft.extend(aux, ids[:, :length], positions, cache)
        outs = [logits]
        for j in range(2):
            logits, hidden = draft.step(hidden[:, -1:], ids[:, length + j:length + j + 1],
                                        positions[:, -1:] + j + 1, cache, is_aux=False)
            outs.append(logits)
    return torch.cat(outs, 1)


def write(fmt: str, draft: Eagle3LlamaDraft, out_dir: Union[str, Path], target: dict,
          num_speculative_tokens: int, dtype: str, include_embed: bool) -> Path:
    """Check, reload-check and write the `fmt` export of an Eagle3 draft."""
    from tools.export.base import EXPORT_DTYPES

    cfg = draft.config
    torch_dtype = EXPORT_DTYPES[dtype]
    state = {n: (t.to(torch_dtype) if t.is_floating_point() else t).cpu()
             for n, t in draft_state(draft).items()}
    state["d2t"], state["t2d"] = state["d2t"].long(), state["t2d"].bool()
    embed = draft.embed_tokens.weight.detach().float().cpu()
    if include_embed:
        state["embed_tokens.weight"] = embed.to(torch_dtype)
        embed = state["embed_tokens.weight"].float()  # what the engine will see
    tensors = to_export_names(fmt, cfg, state)
    config = export_config(fmt, cfg, target, num_speculative_tokens, dtype)
    validate_export_tensors(fmt, cfg, tensors, include_embed)
    # reference: the source draft with its weights rounded to the export dtype, computed in float32
    reference = Eagle3LlamaDraft(cfg)
    reference.load_state_dict({**{k: v.float() if v.is_floating_point() else v for k, v in state.items()
                                  if k != "embed_tokens.weight"}, "embed_tokens.weight": embed}, strict=True)
    reference = reference.float().eval()
    reloaded = from_export_names(fmt, cfg, {k: v.clone() for k, v in tensors.items()})
    rebuilt = build_draft("eagle3_llama", config_from_export(fmt, json.loads(json.dumps(config))), reloaded,
                          optional_embed(reloaded, embed), f"{fmt} export")
    check_reload(f"{fmt} export", probe_chain_logits(reference), probe_chain_logits(rebuilt),
                 same_vocab=torch.equal(reference.d2t, rebuilt.d2t))
    files = {CONFIG_NAME: json.dumps(config, indent=2).encode(),
             WEIGHTS_NAME: safetensors_bytes(tensors, metadata={"format": "pt"})}
    return write_dir_atomically(out_dir, files)
