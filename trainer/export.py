"""Draft files: Aerie's own format, DeepSpeed checkpoints, and exports for vLLM, SGLang and speculators.

Aerie format (`save_aerie_draft` / `load_aerie_draft`): config.json = Eagle3ModelConfig + {"aerie_format",
"architecture", "metadata"}; model.safetensors = every draft tensor except the frozen embed_tokens (the target's).

Exports (`export`, registered in models.registry.EXPORTS) write config.json + model.safetensors only.  Before
anything is written each export is checked twice: its tensor names and shapes must equal what the engine's loader
expects (`expected_tensors`; SGLang drops unknown or missing names silently), and a draft rebuilt from the exported
config and tensors alone (`load_export`) must reproduce the source draft's logits.  Every write is atomic.

Aux layer ids: vLLM / speculators store the input-to-layer ids top-level; SGLang stores output-of-layer ids
(vLLM id - 1) in eagle_config.  Checked against vLLM llama_eagle3.py / registry.py, SGLang llama_eagle3.py and
speculators' Eagle3SpeculatorConfig (2026).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from torch import Tensor

from models.draft.eagle3 import Eagle3LlamaDraft, Eagle3ModelConfig
from models.registry import DRAFTS, EXPORTS
from models.targets.base import from_sglang_layer_ids, to_sglang_layer_ids

AERIE_FORMAT = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"
EXPORT_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}

# target model_type -> Eagle3 draft architecture each engine registers for it (vLLM registry.py
# _SPECULATIVE_DECODING_MODELS; SGLang serves every Eagle3 draft as LlamaForCausalLMEagle3 and switches to M-RoPE
# itself when rope_scaling carries mrope_section).  None: the engine registers no Eagle3 draft for that target.
MULTIMODAL_ARCHITECTURES = {
    "vllm": {"qwen2_5_vl": "Eagle3Qwen2_5vlForCausalLM", "qwen3_vl": "Eagle3Qwen3vlForCausalLM",
             "qwen2_vl": None, "qwen2_audio": None,
             # speech targets vLLM 0.32 serves with an Eagle3 draft (SupportsEagle3 in qwen3_asr.py and
             # qwen3_omni_moe_thinker.py); the draft is the plain Llama Eagle3 head
             "qwen3_asr": "Eagle3LlamaForCausalLM", "qwen3_omni_moe": "Eagle3LlamaForCausalLM"},
    "sglang": {"qwen2_5_vl": "LlamaForCausalLMEagle3", "qwen3_vl": "LlamaForCausalLMEagle3",
               "qwen2_vl": "LlamaForCausalLMEagle3", "qwen2_audio": None},
}
TEXT_ARCHITECTURES = {"vllm": "Eagle3LlamaForCausalLM", "sglang": "LlamaForCausalLMEagle3",
                      "speculators": "Eagle3Speculator"}


@dataclass
class ExportConfig:
    format: str = "vllm"  # vllm | sglang | speculators
    draft: str = ""  # an Aerie draft dir (<run_dir>/final) or a checkpoint step dir (<run_dir>/ckpt/step-N)
    out_dir: str = ""
    num_speculative_tokens: int = 3
    include_embed: bool = False  # also write embed_tokens.weight (engines take the target's when absent)
    dtype: str = "bfloat16"  # bfloat16 | float16 | float32 for the floating-point tensors
    verifier: str = ""  # the target's name in config.json (hub id); "" -> target.path, a local dir by its name


# ---- atomic directory writes ------------------------------------------------------------------------------
def _write_dir_atomically(out_dir: Union[str, Path], files: Dict[str, bytes]) -> Path:
    """Write `files` into a hidden sibling tmp dir, then swap it in place of out_dir (an older one is replaced)."""
    from data.io import umask_mode

    out = Path(out_dir).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=out.parent))
    os.chmod(tmp, umask_mode(directory=True))  # mkdtemp makes it 0700: unreadable to a serving engine's user
    try:
        for name, payload in files.items():
            (tmp / name).write_bytes(payload)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".old-{out.name}-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _safetensors_bytes(tensors: Dict[str, Tensor], metadata: Optional[Dict[str, str]] = None) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON ({err})") from None


# ---- Aerie's own format -----------------------------------------------------------------------------------
def draft_state(draft: Eagle3LlamaDraft) -> Dict[str, Tensor]:
    """The draft's persistent tensors without the frozen embedding."""
    return {n: t.detach() for n, t in draft.state_dict().items() if not n.startswith("embed_tokens.")}


def save_aerie_draft(draft: Eagle3LlamaDraft, out_dir: Union[str, Path], state_dict: Optional[Dict[str, Tensor]] = None,
                     metadata: Optional[dict] = None, extra_files: Optional[Dict[str, bytes]] = None) -> Path:
    """Write config.json + model.safetensors (draft weights, d2t, t2d; no embed_tokens) and `extra_files`
    atomically to out_dir."""
    state = {n: t for n, t in (state_dict if state_dict is not None else draft_state(draft)).items()
             if not n.startswith("embed_tokens.")}
    expected = set(draft_state(draft))
    if set(state) != expected:
        raise ValueError(f"save_aerie_draft: state_dict names differ from the draft's: missing "
                         f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}")
    config = {**draft.config.to_dict(), "aerie_format": AERIE_FORMAT, "architecture": draft.architecture,
              "metadata": dict(metadata or {})}
    files = {CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode(), WEIGHTS_NAME: _safetensors_bytes(state),
             **(extra_files or {})}
    return _write_dir_atomically(out_dir, files)


def load_draft_tensors(draft, state: Dict[str, Tensor], embed_weight: Optional[Tensor], source: str):
    """`draft` (freshly built from its config) with `state`'s tensors, its d2t/t2d and the target's embedding, in
    fp32 eval mode; tensors that load_embedding initialises from the embedding (DFlash's mask) keep their values."""
    vocab = {k: state[k] for k in ("d2t", "t2d") if k in state}
    weights = {k: v for k, v in state.items() if k not in ("d2t", "t2d")}
    missing, unexpected = draft.load_state_dict(weights, strict=False)
    missing = [n for n in missing if not n.startswith("embed_tokens.") and n not in ("d2t", "t2d")]
    if missing or unexpected or len(vocab) != 2:
        raise ValueError(f"{source}: tensors do not match the {draft.architecture} config: missing "
                         f"{(missing + sorted({'d2t', 't2d'} - set(vocab)))[:5]}, unexpected {unexpected[:5]}")
    draft.set_draft_vocab(vocab["d2t"], vocab["t2d"])
    if embed_weight is not None:
        loaded = {n: p.detach().clone() for n, p in draft.named_parameters() if not n.startswith("embed_tokens.")}
        draft.load_embedding(embed_weight.to(draft.embed_tokens.weight.dtype))
        draft.load_state_dict(loaded, strict=False)
    return draft.float().eval()


def _build_draft(config: Eagle3ModelConfig, state: Dict[str, Tensor], embed_weight: Optional[Tensor],
                 source: str) -> Eagle3LlamaDraft:
    return load_draft_tensors(Eagle3LlamaDraft(config), state, embed_weight, source)


def load_aerie_draft(path: Union[str, Path], embed_weight: Optional[Tensor] = None) -> Eagle3LlamaDraft:
    """Eagle3LlamaDraft (float32, eval) from an Aerie draft dir; embed_weight (V, H) is the target's embedding."""
    from safetensors.torch import load_file

    path = Path(path)
    raw = _read_json(path / CONFIG_NAME)
    if raw.get("aerie_format") == AERIE_FORMAT and raw.get("architecture") == "dflash":
        from trainer.export_dflash import load_aerie_dflash

        return load_aerie_dflash(path, raw, embed_weight)
    if raw.get("aerie_format") != AERIE_FORMAT or raw.get("architecture") != "eagle3_llama":
        raise ValueError(f"{path / CONFIG_NAME}: not an Aerie eagle3_llama draft (aerie_format "
                         f"{raw.get('aerie_format')!r}, architecture {raw.get('architecture')!r})")
    fields = {f.name for f in dataclasses.fields(Eagle3ModelConfig)}
    config = Eagle3ModelConfig.from_dict({k: v for k, v in raw.items() if k in fields})
    return _build_draft(config, load_file(str(path / WEIGHTS_NAME)), embed_weight, str(path))


def aerie_metadata(path: Union[str, Path]) -> dict:
    return dict(_read_json(Path(path) / CONFIG_NAME).get("metadata") or {})


# ---- DeepSpeed checkpoints -----------------------------------------------------------------------------------
def target_spec_from_config(target_cfg):
    """TargetSpec of a target config (the `target` section) without loading its weights (meta device)."""
    from transformers import AutoConfig

    from models.targets.base import TargetConfig
    from models.targets.hf import HFTargetModel, instantiate_from_config, model_class_for

    known = {f.name for f in dataclasses.fields(TargetConfig)}
    tcfg = TargetConfig(**{k: v for k, v in dict(target_cfg).items() if k in known})
    if tcfg.backend != "hf":
        raise ValueError(f"target.backend={tcfg.backend!r}: rebuilding the target spec supports only 'hf'")
    config = AutoConfig.from_pretrained(tcfg.path, trust_remote_code=tcfg.trust_remote_code)
    with torch.device("meta"):
        module = instantiate_from_config(model_class_for(config, tcfg), config, tcfg.trust_remote_code)
    return HFTargetModel(module, tcfg, name_or_path=tcfg.path).spec


def load_draft_from_checkpoint(step_dir: Union[str, Path], embed_weight: Optional[Tensor] = None) -> Eagle3LlamaDraft:
    """Draft from `<run_dir>/ckpt/step-N/`: ZeRO shards (any stage) consolidated, `draft.` prefix stripped."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from omegaconf import OmegaConf
    from safetensors.torch import load_file

    from models.draft.eagle3 import DraftConfig
    from trainer.checkpoint import checkpoint_problem

    step_dir = Path(step_dir).resolve()
    for name in ("config.yaml", "vocab.safetensors"):
        if not (step_dir / name).is_file():
            raise ValueError(f"{step_dir}: not an Aerie checkpoint step dir (no {name})")
    why = checkpoint_problem(step_dir)  # checksums, and weights-only unpickling before DeepSpeed's full one
    if why is not None:
        raise ValueError(f"{step_dir}: refusing to load this checkpoint: {why}")
    cfg = OmegaConf.to_container(OmegaConf.load(step_dir / "config.yaml"), resolve=True)
    if "draft" not in cfg or "target" not in cfg:
        raise ValueError(f"{step_dir / 'config.yaml'}: needs 'draft' and 'target' sections")
    draft_cls = DRAFTS.get(cfg["draft"].get("arch", "eagle3_llama"))  # the architecture the run trained
    schema = getattr(draft_cls, "config_class", DraftConfig)
    known = {f.name for f in dataclasses.fields(schema)}
    draft_cfg = schema(**{k: v for k, v in cfg["draft"].items() if k in known})
    config = draft_cls.from_target(draft_cfg, target_spec_from_config(cfg["target"])).config
    consolidated = get_fp32_state_dict_from_zero_checkpoint(str(step_dir.parent), tag=step_dir.name)
    state = {n[len("draft."):]: t for n, t in consolidated.items() if n.startswith("draft.")}
    # buffers come back as float from zero_to_fp32: the vocabulary is taken from vocab.safetensors instead
    state.update({k: v for k, v in load_file(str(step_dir / "vocab.safetensors")).items() if k in ("d2t", "t2d")})
    if getattr(draft_cls, "architecture", "") == "dflash":
        from trainer.export_dflash import build_dflash

        return build_dflash(config, state, embed_weight, str(step_dir))
    return _build_draft(config, state, embed_weight, str(step_dir))


def load_draft(path: Union[str, Path], embed_weight: Optional[Tensor] = None) -> Eagle3LlamaDraft:
    """An Aerie draft dir or a checkpoint step dir."""
    path = Path(path)
    if (path / CONFIG_NAME).is_file():
        return load_aerie_draft(path, embed_weight)
    if (path / "config.yaml").is_file():
        return load_draft_from_checkpoint(path, embed_weight)
    raise ValueError(f"{path}: neither an Aerie draft dir (config.json) nor a checkpoint step dir (config.yaml)")


def load_target_embedding(target_path: Union[str, Path]) -> Tensor:
    """The target's input embedding (V, H) read alone from its safetensors files (local dir)."""
    from safetensors import safe_open

    root = Path(target_path)
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{root}: no *.safetensors files to read the target's embed_tokens from")
    candidates = []
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            candidates += [(name, file) for name in handle.keys() if name.endswith("embed_tokens.weight")]
    if not candidates:
        raise ValueError(f"{root}: no tensor named *embed_tokens.weight")
    # the text decoder's table: prefer language_model.* over any other (e.g. audio/vision) embed_tokens
    name, file = sorted(candidates, key=lambda c: ("language_model" not in c[0], len(c[0])))[0]
    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(name)


# ---- what each engine expects --------------------------------------------------------------------------------
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
        raise ValueError(f"SGLang's LlamaForCausalLMEagle3 serves 1-layer drafts only (older versions raise; newer ones "
                         f"drop the residual between extra layers); this draft has {cfg.num_layers}: export vllm")
    switches = [name for name in ("norm_before_fc", "fc_norm", "norm_output") if getattr(cfg, name)]
    if fmt == "sglang" and switches:
        raise ValueError(f"SGLang's LlamaForCausalLMEagle3 has no EAGLE 3.1 switches; this draft was trained with "
                         f"{', '.join(switches)}: export vllm or speculators")
    if fmt == "sglang" and cfg.norm_before_residual:
        raise ValueError("SGLang ignores norm_before_residual (always adds the un-normalised hidden); this draft was "
                         "trained with norm_before_residual=true: export vllm or speculators")


def expected_tensors(fmt: str, cfg: Eagle3ModelConfig, include_embed: bool = False) -> Dict[str, Tuple[int, ...]]:
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
                   "norm.weight": (cfg.hidden_size,), "lm_head.weight": (cfg.draft_vocab_size, cfg.hidden_size),
                   "d2t": (cfg.draft_vocab_size,), "t2d": (cfg.vocab_size,)})
    if include_embed:
        shapes["embed_tokens.weight"] = (cfg.vocab_size, cfg.hidden_size)
    return shapes


def _name_and_shape_problems(expected: Dict[str, Tuple[int, ...]], shapes: Dict[str, Tuple[int, ...]]) -> str:
    """'' when the names and shapes are exactly the expected ones, else what differs."""
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = [f"{n} {shapes[n]} != {expected[n]}" for n in sorted(set(expected) & set(shapes)) if shapes[n] != expected[n]]
    return f"missing {missing}, unexpected {unexpected}, wrong shapes {wrong}" if missing or unexpected or wrong else ""


def validate_export_tensors(fmt: str, cfg: Eagle3ModelConfig, tensors: Dict[str, Tensor],
                            include_embed: bool = False) -> None:
    problems = _name_and_shape_problems(expected_tensors(fmt, cfg, include_embed),
                                        {n: tuple(t.shape) for n, t in tensors.items()})
    if problems:
        raise ValueError(f"{fmt} export refused: {problems}")
    if tensors["d2t"].dtype != torch.int64 or tensors["t2d"].dtype != torch.bool:
        raise ValueError(f"{fmt} export refused: d2t must be int64 and t2d bool, got {tensors['d2t'].dtype}, "
                         f"{tensors['t2d'].dtype}")


# ---- config.json of each engine -------------------------------------------------------------------------------
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
            raise ValueError(f"{fmt} registers no Eagle3 draft architecture for target model_type {model_type!r}; "
                             f"no export for it (see trainer/export.py MULTIMODAL_ARCHITECTURES)")
        return table[model_type]
    return TEXT_ARCHITECTURES[fmt]


def export_config(fmt: str, cfg: Eagle3ModelConfig, target: dict, num_speculative_tokens: int, dtype: str) -> dict:
    """The config.json an engine reads for this draft."""
    check_servable(fmt, cfg)
    # what the draft was trained with (vLLM aux-id convention), so that an edited config.json is refused
    aerie = {"num_speculative_tokens": num_speculative_tokens, "target": target.get("name_or_path", ""),
             "aux_layer_ids": list(cfg.aux_layer_ids), "rope_theta": cfg.rope_theta}
    draft_fields = {"draft_vocab_size": cfg.draft_vocab_size, "target_hidden_size": cfg.target_hidden_size,
                    "norm_before_residual": cfg.norm_before_residual}
    if fmt != "sglang":  # EAGLE 3.1 keys vLLM and speculators read top-level
        draft_fields.update(norm_before_fc=cfg.norm_before_fc, fc_norm=cfg.fc_norm, norm_output=cfg.norm_output)
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
            llama, aux = exported, from_sglang_layer_ids(exported["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
        else:
            llama, aux = exported, exported["eagle_aux_hidden_state_layer_ids"]
        return Eagle3ModelConfig(
            hidden_size=llama["hidden_size"], intermediate_size=llama["intermediate_size"],
            num_attention_heads=llama["num_attention_heads"], num_key_value_heads=llama["num_key_value_heads"],
            head_dim=llama["head_dim"], rms_norm_eps=llama["rms_norm_eps"], rope_theta=llama["rope_theta"],
            rope_scaling=llama["rope_scaling"], max_position_embeddings=llama["max_position_embeddings"],
            vocab_size=llama["vocab_size"], draft_vocab_size=exported["draft_vocab_size"],
            target_hidden_size=exported["target_hidden_size"], num_aux_layers=len(aux),
            num_layers=llama["num_hidden_layers"], norm_before_residual=bool(exported["norm_before_residual"]),
            aux_layer_ids=list(aux), norm_before_fc=bool(exported.get("norm_before_fc", False)),
            fc_norm=bool(exported.get("fc_norm", False)), norm_output=bool(exported.get("norm_output", False)))
    except KeyError as err:
        raise ValueError(f"{fmt} config.json lacks key {err}") from None


# ---- tensor names ----------------------------------------------------------------------------------------------
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


def load_export(path: Union[str, Path], fmt: str, embed_weight: Optional[Tensor] = None) -> Eagle3LlamaDraft:
    """Rebuild an Aerie draft from an engine export (config.json + model.safetensors) alone."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg = config_from_export(fmt, _read_json(path / CONFIG_NAME))
    state = from_export_names(fmt, cfg, load_file(str(path / WEIGHTS_NAME)))
    exported_embed = state.pop("embed_tokens.weight", None)
    return _build_draft(cfg, state, exported_embed if exported_embed is not None else embed_weight, str(path))


# ---- validation of an export on disk against its target, before an engine starts -------------------------------
def is_engine_export(path: Union[str, Path]) -> bool:
    """A directory holding an engine export (config.json with `architectures`), not an Aerie draft."""
    config = Path(path) / CONFIG_NAME
    if not config.is_file():
        return False
    raw = _read_json(config)
    return "architectures" in raw and "aerie_format" not in raw


def export_format(path: Union[str, Path]) -> str:
    """vllm | sglang | speculators, read from an export's config.json."""
    path = Path(path)
    if not (path / CONFIG_NAME).is_file() or not (path / WEIGHTS_NAME).is_file():
        raise ValueError(f"{path}: not an engine export (needs {CONFIG_NAME} and {WEIGHTS_NAME})")
    raw = _read_json(path / CONFIG_NAME)
    if raw.get("speculators_model_type") == "eagle3":
        return "speculators"
    architectures = set(raw.get("architectures") or [])
    if "eagle_config" in raw and architectures & {"LlamaForCausalLMEagle3"}:
        return "sglang"
    vllm_names = {TEXT_ARCHITECTURES["vllm"]} | {a for a in MULTIMODAL_ARCHITECTURES["vllm"].values() if a}
    if architectures & vllm_names:
        return "vllm"
    raise ValueError(f"{path / CONFIG_NAME}: architectures {sorted(architectures)} is no Eagle3 export Aerie knows")


def _safetensors_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def validate_export(path: Union[str, Path], target=None, draft_config: Optional[Eagle3ModelConfig] = None) -> str:
    """Refuse an export an engine would reject or serve at low acceptance; returns its format.

    Checks the tensor names and shapes against the engine's loader, the aux layer ids and rope_theta against
    what the draft was trained with (the export's `aerie` record and/or `draft_config`), and, with `target`
    (TargetSpec, or a target config / dict with `path`), its hidden size, vocabulary, layers and rope_theta.
    """
    path = Path(path)
    fmt = export_format(path)
    cfg = config_from_export(fmt, _read_json(path / CONFIG_NAME))
    shapes = _safetensors_shapes(path / WEIGHTS_NAME)
    problems = _name_and_shape_problems(expected_tensors(fmt, cfg, include_embed="embed_tokens.weight" in shapes),
                                        shapes)
    if problems:
        raise ValueError(f"{path}: {fmt} export refused: {problems}")
    record = _read_json(path / CONFIG_NAME).get("aerie") or {}
    trained = {"aux_layer_ids": record.get("aux_layer_ids"), "rope_theta": record.get("rope_theta")}
    if draft_config is not None:
        trained = {"aux_layer_ids": list(draft_config.aux_layer_ids), "rope_theta": draft_config.rope_theta}
    if trained["aux_layer_ids"] is not None and list(cfg.aux_layer_ids) != list(trained["aux_layer_ids"]):
        raise ValueError(f"{path}: aux layer ids {list(cfg.aux_layer_ids)} (vLLM convention) differ from the ids the "
                         f"draft was trained with, {list(trained['aux_layer_ids'])}")
    if trained["rope_theta"] is not None and float(cfg.rope_theta) != float(trained["rope_theta"]):
        raise ValueError(f"{path}: rope_theta {cfg.rope_theta} differs from the draft's trained {trained['rope_theta']}")
    if target is not None:
        _check_export_against_target(path, cfg, target)
    return fmt


def _check_export_against_target(path: Path, cfg: Eagle3ModelConfig, target) -> None:
    from models.targets.base import TargetSpec, validate_aux_layer_ids

    spec = target if isinstance(target, TargetSpec) else target_spec_from_config(
        {"path": str(target)} if isinstance(target, (str, Path)) else dict(target))
    problems = [f"{name} {mine} != the target's {theirs}" for name, mine, theirs in (
        ("target_hidden_size", cfg.target_hidden_size, spec.hidden_size),
        ("vocab_size", cfg.vocab_size, spec.vocab_size),
        ("rope_theta", float(cfg.rope_theta), float(spec.rope_theta))) if mine != theirs]
    if problems:
        raise ValueError(f"{path}: export does not match target {spec.name_or_path}: {'; '.join(problems)}")
    try:
        validate_aux_layer_ids(cfg.aux_layer_ids, spec.num_layers)
    except ValueError as err:
        raise ValueError(f"{path}: {err} (target {spec.name_or_path})") from None


# ---- export -----------------------------------------------------------------------------------------------------
def target_info(target) -> dict:
    """{name_or_path, model_type, architectures} from a TargetSpec, a dict, or a model path / hub id."""
    if target is None:
        return {}
    if isinstance(target, dict):
        return dict(target)
    if isinstance(target, (str, Path)):
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(target))
        return {"name_or_path": str(target), "model_type": config.model_type,
                "architectures": list(getattr(config, "architectures", None) or [])}
    return {"name_or_path": target.name_or_path, "model_type": target.model_type,
            "architectures": list(target.architectures)}


def _reload_check(fmt: str, out_tensors: Dict[str, Tensor], exported_config: dict, reference: Eagle3LlamaDraft,
                  embed_weight: Tensor) -> None:
    """A draft rebuilt from the export alone must give the reference draft's logits (prefix + 2 chained steps)."""
    cfg = config_from_export(fmt, json.loads(json.dumps(exported_config)))
    state = from_export_names(fmt, cfg, {k: v.clone() for k, v in out_tensors.items()})
    exported_embed = state.pop("embed_tokens.weight", None)
    rebuilt = _build_draft(cfg, state, exported_embed if exported_embed is not None else embed_weight, f"{fmt} export")
    generator = torch.Generator().manual_seed(0)
    length, c = 6, reference.config
    aux = torch.randn(1, length, c.num_aux_layers * c.target_hidden_size, generator=generator)
    ids = torch.randint(0, c.vocab_size, (1, length + 2), generator=generator)
    positions = torch.arange(length)[None]
    results = []
    for model in (reference, rebuilt):
        cache = model.new_cache()
        with torch.no_grad():
            logits, hidden = model.extend(aux, ids[:, :length], positions, cache)
            outs = [logits]
            for j in range(2):
                logits, hidden = model.step(hidden[:, -1:], ids[:, length + j:length + j + 1],
                                            positions[:, -1:] + j + 1, cache, is_aux=False)
                outs.append(logits)
        results.append(torch.cat(outs, 1))
    if not torch.equal(reference.d2t, rebuilt.d2t) or not torch.allclose(results[0], results[1], atol=1e-4, rtol=1e-4):
        diff = (results[0] - results[1]).abs().max().item()
        raise ValueError(f"{fmt} export refused: the draft rebuilt from the export does not reproduce the trained "
                         f"draft (max logit difference {diff:.3g})")


def export(draft_or_path, out_dir: Union[str, Path], format: str, target=None, num_speculative_tokens: int = 3,
           include_embed: bool = False, dtype: str = "bfloat16", embed_weight: Optional[Tensor] = None) -> Path:
    """Write an engine export of a draft (object, Aerie dir or checkpoint step dir) to out_dir.

    target: TargetSpec, {name_or_path, model_type, architectures}, or a model path; None -> the draft's metadata.
    embed_weight: the target's (V, H) embedding; needed with include_embed when the draft comes from a path.
    """
    fmt = format
    if fmt not in TEXT_ARCHITECTURES:
        raise ValueError(f"unknown export format {fmt!r}; available: {', '.join(sorted(TEXT_ARCHITECTURES))}")
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype {dtype!r} not one of {sorted(EXPORT_DTYPES)}")
    if int(num_speculative_tokens) < 1:
        raise ValueError(f"num_speculative_tokens must be >= 1, got {num_speculative_tokens}")
    if isinstance(draft_or_path, (str, Path)):
        if target is None and (Path(draft_or_path) / CONFIG_NAME).is_file():
            target = aerie_metadata(draft_or_path).get("target")
        if include_embed and embed_weight is None:
            raise ValueError("include_embed with a draft path needs the target's embedding (embed_weight)")
        draft = load_draft(draft_or_path, embed_weight)
    else:
        draft = draft_or_path
    info = target_info(target)
    if not info:
        raise ValueError("export needs the target (TargetSpec, dict or path): its name, model_type, architectures")
    if draft.architecture == "dflash":  # block drafter: its own layout (trainer/export_dflash.py)
        from trainer.export_dflash import export_dflash

        return export_dflash(draft, out_dir, fmt, info, dtype)
    cfg = draft.config
    torch_dtype = EXPORT_DTYPES[dtype]
    state = {n: (t.to(torch_dtype) if t.is_floating_point() else t).cpu() for n, t in draft_state(draft).items()}
    state["d2t"], state["t2d"] = state["d2t"].long(), state["t2d"].bool()
    embed = draft.embed_tokens.weight.detach().float().cpu()
    if include_embed:
        state["embed_tokens.weight"] = embed.to(torch_dtype)
        embed = state["embed_tokens.weight"].float()  # what the engine will see
    tensors = to_export_names(fmt, cfg, state)
    config = export_config(fmt, cfg, info, int(num_speculative_tokens), dtype)
    validate_export_tensors(fmt, cfg, tensors, include_embed)
    # reference: the source draft with its weights rounded to the export dtype, computed in float32
    reference = Eagle3LlamaDraft(cfg)
    reference.load_state_dict({**{k: v.float() if v.is_floating_point() else v for k, v in state.items()
                                  if k != "embed_tokens.weight"}, "embed_tokens.weight": embed}, strict=True)
    _reload_check(fmt, tensors, config, reference.float().eval(), embed)
    files = {CONFIG_NAME: json.dumps(config, indent=2).encode(),
             WEIGHTS_NAME: _safetensors_bytes(tensors, metadata={"format": "pt"})}
    return _write_dir_atomically(out_dir, files)


def _register(fmt: str):
    def run(draft_or_path, out_dir, **kwargs):
        return export(draft_or_path, out_dir, fmt, **kwargs)

    run.__module__ = __name__
    run.__name__ = f"export_{fmt}"
    run.__doc__ = f"export(..., format={fmt!r})"
    return EXPORTS.register(fmt)(run)


export_vllm = _register("vllm")
export_sglang = _register("sglang")
export_speculators = _register("speculators")


def verifier_name(target_path: str, verifier: str = "") -> str:
    """The target's name written into exports: `export.verifier`, else target.path when it is a hub id, else the
    local dir's `_name_or_path` (when a hub id) or folder name: no machine path leaves the trainer."""
    if verifier or not os.path.isdir(target_path):
        return verifier or target_path
    saved = str(_read_json(Path(target_path) / "config.json").get("_name_or_path") or "")
    return saved if saved and not os.path.isabs(saved) and not os.path.exists(saved) else Path(target_path).name


def run_export(cfg) -> Path:
    """`aerie export`: cfg.export (ExportConfig fields) and cfg.target (target.path) of the composed config."""
    ecfg = cfg.export
    if not ecfg.draft or not ecfg.out_dir:
        raise ValueError("export.draft and export.out_dir are required")
    target_path = cfg.target.path if "target" in cfg and cfg.target.path else None
    embed = load_target_embedding(target_path) if ecfg.include_embed and target_path else None
    target = None
    if target_path:
        target = {**target_info(target_path), "name_or_path": verifier_name(target_path, ecfg.get("verifier", ""))}
    out = EXPORTS.get(ecfg.format)(ecfg.draft, ecfg.out_dir, target=target,
                                   num_speculative_tokens=int(ecfg.num_speculative_tokens),
                                   include_embed=bool(ecfg.include_embed), dtype=ecfg.dtype, embed_weight=embed)
    print(f"{ecfg.format} export written to {out}", flush=True)
    return out
