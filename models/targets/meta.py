"""What Aerie knows of a target without its weights: its config, the model on the meta device (TargetSpec, the
final norm's class, parameter counts) and single tensors read from its safetensors files.

models/targets/hf.py, teacher.py, training, export, eval and plan all read targets through it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Dict, List, Union

import torch
from torch import Tensor, nn

from models.targets.base import TargetConfig


def decoder_of(model: nn.Module) -> nn.Module:
    """The text decoder (the module holding embed_tokens, layers and the final norm)."""
    candidates = [getattr(getattr(model, "model", None), "language_model", None),
                  getattr(model, "language_model", None), getattr(model, "model", None)]
    if hasattr(model, "get_decoder"):
        candidates.append(model.get_decoder())
    for module in candidates:
        if module is not None and hasattr(module, "layers") and hasattr(module, "norm"):
            return module
    raise ValueError(f"cannot find the decoder (a module with .layers and .norm) in {type(model).__name__}")


def model_class_for(config, cfg: TargetConfig):
    """The concrete transformers class named by config.architectures, else AutoModelForCausalLM."""
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        model_cls = getattr(transformers, arch, None)
        if model_cls is not None:
            return model_cls
    return transformers.AutoModelForCausalLM


def instantiate_from_config(model_cls, config, trust_remote_code: bool = False) -> nn.Module:
    if hasattr(model_cls, "_from_config"):
        return model_cls._from_config(config)
    return model_cls.from_config(config, trust_remote_code=trust_remote_code)


def load_config(tcfg: TargetConfig):
    """The target's transformers config (AutoConfig)."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tcfg.path,
                                      trust_remote_code=bool(getattr(tcfg, "trust_remote_code", False)))


def meta_model(config, tcfg: TargetConfig) -> nn.Module:
    """The target's model class built from `config` on the meta device (no memory allocated)."""
    with torch.device("meta"):
        return instantiate_from_config(model_class_for(config, tcfg), config, tcfg.trust_remote_code)


def target_spec_from_config(target_cfg):
    """TargetSpec of a target config (the `target` section) without loading its weights (meta device)."""
    from models.targets.hf import HFTargetModel

    known = {f.name for f in dataclasses.fields(TargetConfig)}
    tcfg = TargetConfig(**{k: v for k, v in dict(target_cfg).items() if k in known})
    if tcfg.backend != "hf":
        raise ValueError(f"target.backend={tcfg.backend!r}: rebuilding the target spec supports only 'hf'")
    return HFTargetModel(meta_model(load_config(tcfg), tcfg), tcfg, name_or_path=tcfg.path).spec


def checkpoint_key_files(path: str) -> Dict[str, str]:
    """tensor name -> safetensors file, from the index json when sharded."""
    from safetensors import safe_open

    index_path = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return {key: os.path.join(path, name) for key, name in weight_map.items()}
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise ValueError(f"no model.safetensors or model.safetensors.index.json in {path}")
    with safe_open(single, framework="pt") as f:
        return {key: single for key in f.keys()}


def pick_key(keys: List[str], suffix: str, path: str) -> str:
    """Shortest key ending in suffix that is not inside a vision/audio tower."""
    towers = ("visual", "vision", "audio")
    found = [k for k in keys if (k == suffix or k.endswith("." + suffix)) and not any(t in k for t in towers)]
    if not found:
        raise ValueError(f"no tensor named *{suffix} in the checkpoint at {path}")
    return min(found, key=len)


def read_tensor(key: str, key_files: Dict[str, str]) -> Tensor:
    """One tensor read alone from the file holding it."""
    from safetensors import safe_open

    with safe_open(key_files[key], framework="pt") as f:
        return f.get_tensor(key)


def load_target_embedding(target_path: Union[str, Path]) -> Tensor:
    """The target's input embedding (V, H) read alone from its safetensors files (local dir): the text
    decoder's table, not a vision/audio tower's."""
    key_files = checkpoint_key_files(str(target_path))
    return read_tensor(pick_key(list(key_files), "embed_tokens.weight", str(target_path)), key_files)
