"""`aerie quickstart` (what `make train` runs): train, evaluate and export in one go, then one summary.

Run it again and the trainer resumes from its newest checkpoint, or reports that the draft is done.
"""
from __future__ import annotations

import json
from pathlib import Path

from omegaconf import open_dict


def run_quickstart(cfg) -> dict:
    from trainer.evaluate import run_eval
    from trainer.export import run_export
    from trainer.train import Trainer

    path = Path(cfg.run_dir) / "quickstart_summary.json"
    trainer = Trainer(cfg)
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
    for fmt in ("vllm", "sglang"):
        with open_dict(cfg):
            cfg.export.format = fmt
        exports[fmt] = str(run_export(cfg))
    report = {"draft": str(final), "exports": exports,
              "acceptance": [{k: run[k] for k in ("num_speculative_tokens", "tau", "acceptance_per_position",
                                                  "tokens_per_target_forward", "estimated_speedup")}
                             for run in summary["results"]],
              "eval_reports": summary.get("files", {})}
    path.write_text(json.dumps(report, indent=2))
    _print_summary(cfg, report, path)
    return report


def _print_summary(cfg, report: dict, path: Path) -> None:
    lines = ["", "=" * 72, f"Aerie quickstart: draft for {cfg.target.path}", f"  trained draft   {report['draft']}"]
    for run in report["acceptance"]:
        rates = " ".join(f"{a:.2f}" for a in run["acceptance_per_position"])
        lines.append(f"  k={run['num_speculative_tokens']}  tau={run['tau']:.2f}  (T={cfg.eval.temperature}, "
                     f"{cfg.eval.prompts})  per-position acceptance: {rates}")
    for fmt, out in report["exports"].items():
        lines.append(f"  {fmt:<6} export  {out}")
    lines += [f"  summary         {path}", "=" * 72]
    print("\n".join(lines), flush=True)
