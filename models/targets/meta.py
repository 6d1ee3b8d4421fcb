"""What Aerie knows of a target without its weights: the TargetSpec from its config (meta-device model) and
single tensors read from its safetensors files (the input embedding).  Training, export, eval and plan use it."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Union

import torch
from torch import Tensor


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
