"""Aerie's own draft files, for every architecture: config.json + model.safetensors, written atomically.

config.json = the draft's model config (`model_config_class.to_dict`) + {"aerie_format", "architecture",
"metadata"}; model.safetensors = every draft tensor except the frozen embed_tokens (the target's).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, Optional, Union

from torch import Tensor

from data.io import read_json, safetensors_bytes, write_dir_atomically
from models.draft.base import DraftModel
from models.registry import DRAFTS

AERIE_FORMAT = 1
CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def draft_state(draft: DraftModel) -> Dict[str, Tensor]:
    """The draft's persistent tensors without the frozen embedding."""
    return {n: t.detach() for n, t in draft.state_dict().items() if not n.startswith("embed_tokens.")}


def save_aerie_draft(draft: DraftModel, out_dir: Union[str, Path],
                     state_dict: Optional[Dict[str, Tensor]] = None,
                     metadata: Optional[dict] = None, extra_files: Optional[Dict[str, bytes]] = None) -> Path:
    """Write config.json + model.safetensors (draft weights, d2t, t2d; no embed_tokens) and `extra_files`
    atomically to out_dir."""
    state = {n: t for n, t in (state_dict if state_dict is not None else draft_state(draft)).items()
             if not n.startswith("embed_tokens.")}
    expected = set(draft_state(draft))
    if set(state) != expected:
        raise ValueError(f"save_aerie_draft: state_dict names differ from the draft's: missing "
                         f"{sorted(expected - set(state))[:5]}, "
                         f"unexpected {sorted(set(state) - expected)[:5]}")
    config = {**draft.config.to_dict(), "aerie_format": AERIE_FORMAT, "architecture": draft.architecture,
              "metadata": dict(metadata or {})}
    files = {CONFIG_NAME: json.dumps(config, indent=2, sort_keys=True).encode(),
             WEIGHTS_NAME: safetensors_bytes(state), **(extra_files or {})}
    return write_dir_atomically(out_dir, files)


def load_draft_tensors(draft: DraftModel, state: Dict[str, Tensor], embed_weight: Optional[Tensor],
                       source: str):
    """`draft` (freshly built from its config) with `state`'s tensors, its d2t/t2d and the target's embedding,
    in fp32 eval mode; tensors that load_embedding initialises from the embedding (DFlash's mask) keep their
    values."""
    vocab = {k: state[k] for k in ("d2t", "t2d") if k in state}
    weights = {k: v for k, v in state.items() if k not in ("d2t", "t2d")}
    missing, unexpected = draft.load_state_dict(weights, strict=False)
    missing = [n for n in missing if not n.startswith("embed_tokens.") and n not in ("d2t", "t2d")]
    if missing or unexpected or len(vocab) != 2:
        raise ValueError(f"{source}: tensors do not match the {draft.architecture} config: missing "
                         f"{(missing + sorted({'d2t', 't2d'} - set(vocab)))[:5]}, "
                         f"unexpected {unexpected[:5]}")
    draft.set_draft_vocab(vocab["d2t"], vocab["t2d"])
    if embed_weight is not None:
        loaded = {n: p.detach().clone() for n, p in draft.named_parameters()
                  if not n.startswith("embed_tokens.")}
        draft.load_embedding(embed_weight.to(draft.embed_tokens.weight.dtype))
        draft.load_state_dict(loaded, strict=False)
    return draft.float().eval()


def build_draft(arch: str, config, state: Dict[str, Tensor], embed_weight: Optional[Tensor],
                source: str) -> DraftModel:
    """A draft of architecture `arch` from its model config and tensors (float32, eval)."""
    return load_draft_tensors(DRAFTS.get(arch)(config), state, embed_weight, source)


def model_config_from_dict(arch: str, raw: dict):
    """The `arch` draft's model config from a config.json's fields (unknown keys ignored)."""
    config_class = DRAFTS.get(arch).model_config_class
    fields = config_class.__dataclass_fields__
    return config_class.from_dict({k: v for k, v in raw.items() if k in fields})


def load_aerie_draft(path: Union[str, Path], embed_weight: Optional[Tensor] = None) -> DraftModel:
    """The draft (float32, eval) of an Aerie draft dir; embed_weight (V, H) is the target's embedding."""
    from safetensors.torch import load_file

    path = Path(path)
    raw = read_json(path / CONFIG_NAME)
    arch = raw.get("architecture")
    if raw.get("aerie_format") != AERIE_FORMAT or arch not in DRAFTS:
        raise ValueError(f"{path / CONFIG_NAME}: not an Aerie draft "
                         f"(aerie_format {raw.get('aerie_format')!r}, "
                         f"architecture {arch!r}; architectures: {', '.join(DRAFTS.names())})")
    return build_draft(arch, model_config_from_dict(arch, raw), load_file(str(path / WEIGHTS_NAME)),
                       embed_weight, str(path))


def aerie_metadata(path: Union[str, Path]) -> dict:
    return dict(read_json(Path(path) / CONFIG_NAME).get("metadata") or {})
