"""Checks shared by every export format, run before anything is written or served.

An export must hold exactly the tensor names and shapes the engine's loader takes (an engine may drop unknown
or missing names silently), the aux layer ids and rope_theta the draft was trained with, the target's sizes,
and a draft rebuilt from the export alone must reproduce the source draft's logits.
"""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from models.targets.base import TargetSpec, validate_aux_layer_ids
from models.targets.meta import target_spec_from_config


def name_and_shape_problems(expected: Dict[str, Tuple[int, ...]], shapes: Dict[str, Tuple[int, ...]]) -> str:
    """'' when the names and shapes are exactly the expected ones, else what differs."""
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    wrong = [f"{n} {shapes[n]} != {expected[n]}"
             for n in sorted(set(expected) & set(shapes)) if shapes[n] != expected[n]]
    return f"missing {missing}, unexpected {unexpected}, wrong shapes {wrong}" \
        if missing or unexpected or wrong else ""


def safetensors_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """{name: shape} of a safetensors file, read from its header alone."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}


def check_trained_settings(path: Path, cfg, record: dict, draft_config=None) -> None:
    """The export's aux layer ids and rope_theta are the ones the draft was trained with (its `aerie` record,
    or `draft_config`)."""
    trained = {"aux_layer_ids": record.get("aux_layer_ids"), "rope_theta": record.get("rope_theta")}
    if draft_config is not None:
        trained = {"aux_layer_ids": list(draft_config.aux_layer_ids), "rope_theta": draft_config.rope_theta}
    if trained["aux_layer_ids"] is not None and list(cfg.aux_layer_ids) != list(trained["aux_layer_ids"]):
        raise ValueError(f"{path}: aux layer ids {list(cfg.aux_layer_ids)} (vLLM convention) "
                         f"differ from the ids the draft was trained with, {list(trained['aux_layer_ids'])}")
    if trained["rope_theta"] is not None and float(cfg.rope_theta) != float(trained["rope_theta"]):
        raise ValueError(f"{path}: rope_theta {cfg.rope_theta} "
                         f"differs from the draft's trained {trained['rope_theta']}")


def check_against_target(path: Path, cfg, target) -> None:
    """The export's hidden size, vocabulary, rope_theta and aux layers fit `target` (TargetSpec, or a target
    config / dict with `path`, or a path)."""
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


def check_reload(what: str, expected_logits: Tensor, rebuilt_logits: Tensor, same_vocab: bool = True) -> None:
    """The draft rebuilt from the export gives the source draft's logits (and draft vocabulary)."""
    if not same_vocab or not torch.allclose(expected_logits, rebuilt_logits, atol=1e-4, rtol=1e-4):
        diff = (expected_logits - rebuilt_logits).abs().max().item()
        raise ValueError(f"{what} refused: the draft rebuilt from the export does not reproduce the trained "
                         f"draft (max logit difference {diff:.3g})")


def optional_embed(state: Dict[str, Tensor], embed_weight: Optional[Tensor]) -> Optional[Tensor]:
    """The embedding an export carries (popped from `state`), else `embed_weight`."""
    exported = state.pop("embed_tokens.weight", None)
    return exported if exported is not None else embed_weight
