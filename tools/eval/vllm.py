"""`aerie eval engine=vllm`: acceptance (and tokens/s) measured by real vLLM on an export of the draft, and
the in-loop variant on the current weights (trainer.spec_eval_engine=vllm)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Union

from torch import Tensor

from data.template import render_prompt
from models.draft.base import DraftModel
from tools.eval.decode import EvalConfig, check_eval_config, check_verify, load_prompts
from tools.eval.report import eval_summary, summarize_vllm_run


def vllm_speculative_config(export_dir, k: int, temperature: float, verify: str) -> dict:
    """vLLM's speculative_config for a chain of k drafts verified like eval.verify (vLLM's default: greedy
    drafts)."""
    from tools.export.base import vllm_method

    config = {"method": vllm_method(export_dir), "model": str(export_dir), "num_speculative_tokens": int(k)}
    if temperature > 0 and check_verify(verify) == "exact":
        config["draft_sample_method"] = "probabilistic"
    return config


def evaluate_with_vllm(export_dir, target_path: str, tokenizer, cfg: EvalConfig, engine,
                       measure_speedup: bool = True) -> dict:
    """Acceptance measured by vLLM (its spec_decode counters) for each k, and (measure_speedup) its tokens/s
    with the draft over the target alone, run in the same worker."""
    from tools.vllm.engine import run_vllm

    ks = check_eval_config(cfg)
    prompts = [render_prompt(tokenizer, conv) for conv in load_prompts(cfg.prompts, cfg.max_prompts)]
    longest = max(len(ids) for ids in prompts) + cfg.max_new_tokens
    if longest > engine.max_model_len:
        raise ValueError(f"engine.max_model_len={engine.max_model_len} is below the longest prompt + "
                         f"eval.max_new_tokens ({longest}); raise engine.max_model_len")
    common = {"prompt_token_ids": prompts, "max_new_tokens": cfg.max_new_tokens,
              "temperature": cfg.temperature, "seed": cfg.seed}
    runs = [{"name": "target", "speculative_config": None, **common}] if measure_speedup else []
    runs += [{"name": f"k{k}",
              "speculative_config": vllm_speculative_config(export_dir, k, cfg.temperature, cfg.verify),
              **common} for k in ks]
    raw = run_vllm({"target": str(target_path), "runs": runs}, engine)
    result = {run["name"]: run for run in raw["runs"]}
    baseline = (result["target"]["num_generated_tokens"] / result["target"]["generate_seconds"]
                if measure_speedup else float("nan"))
    summaries = [summarize_vllm_run(result[f"k{k}"], k, baseline) for k in ks]
    # True: vLLM's CPU temperature expansion was broken and the worker fixed it (tools/vllm/worker.py)
    return eval_summary(cfg, "vllm", summaries, export=str(export_dir), target_tokens_per_second=baseline,
                        vllm_cpu_expand_kernel_fixed=raw.get("cpu_expand_kernel_fixed", False))


def default_export_dir(draft: Union[str, Path]) -> Path:
    """Where `aerie export` puts the vllm export of a draft: <run_dir>/export/vllm for <run_dir>/final."""
    draft = Path(draft)
    return draft.parent / "export" / "vllm" if draft.name == "final" else draft / "export-vllm"


def _newest_mtime(path: Path) -> float:
    return max((f.stat().st_mtime for f in path.rglob("*") if f.is_file()), default=0.0)


def vllm_export_for_eval(draft: str, export_dir: str, target_cfg) -> Path:
    """The vllm export to serve: eval.draft itself when it is one, else export_dir, (re)written from the draft
    when missing or older than it; validated against the target and the draft before vLLM ever starts."""
    from tools.export.base import export, export_format, is_engine_export, validate_export
    from trainer.checkpoint import load_draft

    draft_path = Path(draft)
    if is_engine_export(draft_path):
        if export_format(draft_path) != "vllm":
            raise ValueError(f"eval.draft={draft}: a {export_format(draft_path)} export; "
                             f"engine=vllm serves vllm exports (give the Aerie draft and it is exported)")
        validate_export(draft_path, target=target_cfg)
        return draft_path
    source = load_draft(draft_path)  # ValueError naming the path when it is neither a draft nor a checkpoint
    out = Path(export_dir) if export_dir else default_export_dir(draft_path)
    if not is_engine_export(out) or _newest_mtime(out) < _newest_mtime(draft_path):
        export(str(draft_path), out, "vllm", target=str(target_cfg["path"]))
    validate_export(out, target=target_cfg, draft_config=source.config)
    return out


def evaluate_state_with_vllm(draft: DraftModel, state: Dict[str, Tensor], cfg, ecfg: EvalConfig,
                             work_dir: Path) -> dict:
    """In-loop (trainer.spec_eval_engine=vllm): the current weights saved, exported for vLLM into work_dir and
    measured by vLLM (no tokens/s baseline)."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from models.draft.io import save_aerie_draft
    from tools.export.base import export, validate_export
    from tools.vllm.engine import engine_config

    target_cfg = OmegaConf.to_container(cfg.target, resolve=True)
    save_aerie_draft(draft, work_dir / "draft", state_dict=state, metadata={"target": target_cfg["path"]})
    out = export(str(work_dir / "draft"), work_dir / "vllm", "vllm", target=target_cfg["path"])
    validate_export(out, target=target_cfg, draft_config=draft.config)
    tokenizer = AutoTokenizer.from_pretrained(target_cfg["path"],
                                              trust_remote_code=bool(target_cfg.get("trust_remote_code")))
    engine = engine_config(cfg)
    engine.name = "vllm"
    return evaluate_with_vllm(out, target_cfg["path"], tokenizer, ecfg, engine, measure_speedup=False)
