"""`aerie quickstart` (what `make train` runs): train, evaluate and export in one go, then one summary.

When vLLM is installed (`.venv-vllm`, or engine.python), the vllm export is also served by vLLM with the same
prompts, k and T, and the summary prints vLLM's own tau next to Aerie's.
Run it again and the trainer resumes from its newest checkpoint, or reports that the draft is done.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import open_dict


def quickstart_formats(arch: str, model_config) -> list:
    """The formats the quickstart writes for a trained draft: vLLM's, and SGLang's where it serves the draft
    (not DFlash, not the EAGLE 3.1 switches)."""
    from tools.export.base import EXPORTS

    return [fmt for fmt in ("vllm", "sglang") if EXPORTS.get(fmt).refusal(arch, model_config) is None]


def run_quickstart(cfg) -> dict:
    from tools.eval.in_loop import speculative_eval
    from tools.eval.run import run_eval
    from tools.export.base import run_export
    from trainer.train import Trainer

    path = Path(cfg.run_dir) / "quickstart_summary.json"
    trainer = Trainer(cfg, spec_eval=speculative_eval)
    already_done = trainer.step >= cfg.trainer.max_steps
    final = trainer.fit()
    if final.name != "final" or not trainer.dist.is_main:  # preempted (checkpoint written), or not rank 0
        return {}
    if already_done and path.is_file():
        report = json.loads(path.read_text())
        _print_summary(cfg, report, path)
        return report
    summary = run_eval(cfg)
    exports = {}
    for fmt in quickstart_formats(cfg.draft.arch, trainer.draft.config):
        with open_dict(cfg):
            cfg.export.format = fmt
        exports[fmt] = str(run_export(cfg))
    keys = ("num_speculative_tokens", "tau", "acceptance_per_position", "tokens_per_target_forward",
            "speedup")
    report = {"draft": str(final), "exports": exports,
              "acceptance": [{k: run[k] for k in keys} for run in summary["results"]],
              "eval_reports": summary.get("files", {})}
    vllm = _vllm_summary(cfg, exports["vllm"])
    if isinstance(vllm, str):
        report["vllm_not_measured"] = vllm
    else:
        report["vllm_acceptance"] = [{k: run[k] for k in keys} for run in vllm["results"]]
    path.write_text(json.dumps(report, indent=2))
    _print_summary(cfg, report, path)
    return report


def _vllm_summary(cfg, export_dir: str):
    """vLLM's own measurement of the export (same prompts, k, T), or why there is none (not installed,
    failed)."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer

    from tools.eval.decode import EvalConfig
    from tools.eval.vllm import evaluate_with_vllm
    from tools.vllm.engine import VllmRunError, engine_config, vllm_python

    engine = engine_config(cfg)
    try:
        vllm_python(engine.python)
    except ValueError as err:
        print(f"vLLM not measured: {err}", flush=True)
        return "vLLM is not installed: `make engine`"
    ecfg = EvalConfig(**{**OmegaConf.to_container(cfg.eval, resolve=True), "out_dir": ""})
    tokenizer = AutoTokenizer.from_pretrained(cfg.target.path)
    try:  # the draft, Aerie's eval and the exports are written by now: a failing engine does not undo them
        return evaluate_with_vllm(export_dir, cfg.target.path, tokenizer, ecfg, engine)
    except (ValueError, VllmRunError) as err:
        print(f"vLLM measurement failed (the draft and exports are written): {err}",
              file=sys.stderr, flush=True)
        return "vLLM's run failed, see above"


def _print_summary(cfg, report: dict, path: Path) -> None:
    """vLLM's τ first when it measured the export (the figure that counts), Aerie's decoder's after."""
    settings = (f"T={cfg.eval.temperature}, {cfg.eval.prompts}, {cfg.eval.max_prompts} prompts x "
                f"{cfg.eval.max_new_tokens} new tokens")
    lines = ["", "=" * 72, f"Aerie quickstart: draft for {cfg.target.path}",
             f"  trained draft   {report['draft']}"]
    if "vllm_acceptance" in report:
        lines.append(f"  tau measured by vLLM serving the vllm export ({settings}):")
        for run in report["vllm_acceptance"]:
            rates = " ".join(f"{a:.2f}" for a in run["acceptance_per_position"])
            lines.append(f"    vLLM k={run['num_speculative_tokens']}  tau={run['tau']:.2f}  per-position "
                         f"acceptance: {rates}  tokens/s vs target alone: x{run['speedup']:.2f}")
    else:
        lines.append(f"  tau measured by Aerie's decoder only ({report.get('vllm_not_measured', 'no vLLM')})")
    lines.append(f"  tau measured by Aerie's decoder on the HF target ({settings}):")
    for run in report["acceptance"]:
        rates = " ".join(f"{a:.2f}" for a in run["acceptance_per_position"])
        lines.append(f"    Aerie k={run['num_speculative_tokens']}  tau={run['tau']:.2f}  "
                     f"per-position acceptance: {rates}")
    for fmt, out in report["exports"].items():
        lines.append(f"  {fmt:<6} export  {out}")
    lines += [f"  summary         {path}", "=" * 72]
    print("\n".join(lines), flush=True)
