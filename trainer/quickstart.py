"""`aerie quickstart` (what `make train` runs): train, evaluate and export in one go, then one summary.

Run it again and the trainer resumes from its newest checkpoint, or reports that the draft is done.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import OmegaConf, open_dict


def run_quickstart(cfg) -> dict:
    from trainer.evaluate import run_eval
    from trainer.export import run_export
    from trainer.train import Trainer

    trainer = Trainer(cfg)
    final = trainer.fit()
    if final.name != "final":  # preempted: the checkpoint is written, nothing to evaluate yet
        return {}
    if not trainer.dist.is_main:
        return {}
    summary = run_eval(cfg)
    exports = {}
    for fmt in ("vllm", "sglang"):
        with open_dict(cfg):
            cfg.export.format = fmt
        exports[fmt] = str(run_export(cfg))
    report = {"draft": str(final), "exports": exports,
              "acceptance": [{k: run[k] for k in ("num_speculative_tokens", "tau", "acceptance_per_position",
                                                  "tokens_per_target_forward", "estimated_speedup")}
                             for run in summary["results"]],
              "eval_reports": summary.get("files", {})}
    path = Path(cfg.run_dir) / "quickstart_summary.json"
    path.write_text(json.dumps(report, indent=2))
    lines = ["", "=" * 72, f"Aerie quickstart: draft for {cfg.target.path}",
             f"  trained draft   {final}"]
    for run in report["acceptance"]:
        rates = " ".join(f"{a:.2f}" for a in run["acceptance_per_position"])
        lines.append(f"  k={run['num_speculative_tokens']}  tau={run['tau']:.2f}  (T={cfg.eval.temperature}, "
                     f"{cfg.eval.prompts})  per-position acceptance: {rates}")
    for fmt, out in exports.items():
        lines.append(f"  {fmt:<6} export  {out}")
    lines += [f"  summary         {path}", "=" * 72]
    print("\n".join(lines), flush=True)
    return report
