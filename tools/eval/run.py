"""`aerie eval`: the draft (Aerie dir, checkpoint or engine export) against its target, on the in-process
decoder (engine=hf, tools/eval/decode.py and block.py), on real vLLM (engine=vllm, tools/eval/vllm.py), or
with media prompts (tools/eval/media.py); prints the JSON summary."""
from __future__ import annotations

import json
from pathlib import Path

from torch import Tensor

from models.draft.base import DraftModel
from tools.eval.decode import EvalConfig, check_eval_config, evaluate_draft, load_target_for_eval
from tools.eval.vllm import evaluate_with_vllm, vllm_export_for_eval


def load_eval_draft(path: str, embed_weight: Tensor) -> DraftModel:
    """An Aerie draft, checkpoint step dir, or engine export (rebuilt from the export alone)."""
    from tools.export.base import export_format, is_engine_export, load_export
    from trainer.checkpoint import load_draft

    if is_engine_export(Path(path)):
        return load_export(path, export_format(path), embed_weight)
    return load_draft(path, embed_weight=embed_weight)


def run_eval(cfg) -> dict:
    """`aerie eval`: cfg.eval (EvalConfig fields), cfg.target (target.path ...) and cfg.engine (hf | vllm);
    prints the JSON summary."""
    from omegaconf import OmegaConf

    from tools.eval.media import is_media_eval, run_media_eval
    from tools.vllm.engine import engine_config

    if is_media_eval(cfg):  # prompts with images / audio through the modality adapter
        return run_media_eval(cfg)
    ecfg = EvalConfig(**OmegaConf.to_container(cfg.eval, resolve=True))
    engine = engine_config(cfg)
    if not ecfg.draft or not cfg.target.path:
        raise ValueError("eval.draft and target.path are required")
    check_eval_config(ecfg)
    if engine.name == "vllm":
        from transformers import AutoTokenizer

        target_cfg = OmegaConf.to_container(cfg.target, resolve=True)
        export_dir = vllm_export_for_eval(ecfg.draft, ecfg.export_dir, target_cfg)
        tokenizer = AutoTokenizer.from_pretrained(cfg.target.path,
                                                  trust_remote_code=bool(cfg.target.get("trust_remote_code")))
        summary = evaluate_with_vllm(export_dir, cfg.target.path, tokenizer, ecfg, engine)
    else:
        target, tokenizer = load_target_for_eval(cfg.target)
        draft = load_eval_draft(ecfg.draft, target.get_input_embeddings().weight.detach().float().cpu())
        summary = evaluate_draft(target, draft.to(next(target.parameters()).device), tokenizer, ecfg)
    print(json.dumps(summary, indent=2), flush=True)
    return summary
