"""vLLM-measured acceptance: a trained draft vs an untrained one, both vLLM draft sampling modes, tokens/s
ratio.

    python bench/engine.py [DRAFT_DIR] [--max-prompts 30] [--max-new-tokens 128] [--ks 3 7]

Target: the tiny trained chat Llama fixture (--target).  DRAFT_DIR (default outputs/quickstart/final) is an
Aerie draft dir or checkpoint step dir; the untrained draft has its shape and vocabulary (random weights,
seed 0).  Both are exported for vLLM and served by real vLLM (one worker, one LLM per row) on MT-Bench first
turns: tau and per-position acceptance from vLLM's counters, at T=0 and at T=1 with draft_sample_method greedy
(vLLM's default) and probabilistic; "x target" is vLLM's generated tokens/s with the draft over the target
alone at the same T, measured in the same worker.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from accept import FIXTURE, untrained_like  # noqa: E402

from data.template import render_prompt  # noqa: E402
from models.draft.io import save_aerie_draft  # noqa: E402
from models.targets.meta import load_target_embedding  # noqa: E402
from tools.eval.decode import load_prompts  # noqa: E402
from tools.eval.report import summarize_vllm_run  # noqa: E402
from tools.export.base import export  # noqa: E402
from tools.vllm.engine import EngineConfig, run_vllm  # noqa: E402
from trainer.checkpoint import load_draft  # noqa: E402

MODES = ((0.0, "greedy"), (1.0, "greedy"), (1.0, "probabilistic"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("draft", nargs="?", default=str(ROOT / "outputs" / "quickstart" / "final"))
    parser.add_argument("--target", default=FIXTURE)
    parser.add_argument("--max-prompts", type=int, default=30)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 7])
    parser.add_argument("--python", default="", help="vLLM's interpreter (default: .venv-vllm)")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    prompts = [render_prompt(tokenizer, conv) for conv in load_prompts("mtbench", args.max_prompts)]
    embed = load_target_embedding(args.target).float()
    trained = load_draft(args.draft, embed_weight=embed)
    with tempfile.TemporaryDirectory(prefix="aerie-bench-engine-") as tmp:
        save_aerie_draft(untrained_like(trained, args.target, embed, 0), Path(tmp) / "untrained")
        exports = {name: export(path, Path(tmp) / f"{name}-vllm", "vllm", target=args.target)
                   for name, path in (("trained", args.draft), ("untrained", str(Path(tmp) / "untrained")))}
        common = {"prompt_token_ids": prompts, "max_new_tokens": args.max_new_tokens, "seed": 0}
        runs = [{"name": f"target T={t}", "speculative_config": None, "temperature": t, **common}
                for t in (0.0, 1.0)]
        rows = [(name, k, t, mode) for name in exports for k in args.ks for t, mode in MODES]
        for name, k, t, mode in rows:
            config = {"method": "eagle3", "model": str(exports[name]), "num_speculative_tokens": k,
                      "draft_sample_method": mode}
            runs.append({"name": f"{name} k={k} T={t} {mode}", "speculative_config": config, "temperature": t,
                         **common})
        engine = EngineConfig(name="vllm", python=args.python, max_model_len=2048)
        result = {run["name"]: run for run in run_vllm({"target": args.target, "runs": runs}, engine)["runs"]}
    baseline = {t: result[f"target T={t}"]["num_generated_tokens"]
                / result[f"target T={t}"]["generate_seconds"] for t in (0.0, 1.0)}
    print(f"vLLM {args.max_prompts} MT-Bench prompts x {args.max_new_tokens} new tokens; target alone: "
          f"{baseline[0.0]:.1f} tok/s (T=0), {baseline[1.0]:.1f} tok/s (T=1)")
    print("| draft | k | T | draft sampling | tau | accept@1..k | tok/s | x target |")
    print("|---|---|---|---|---|---|---|---|")
    for name, k, t, mode in rows:
        s = summarize_vllm_run(result[f"{name} k={k} T={t} {mode}"], k, baseline[t])
        rates = " / ".join(f"{a:.2f}" for a in s["acceptance_per_position"])
        print(f"| {name} | {k} | {t:g} | {mode} | {s['tau']:.3f} | {rates} | {s['tokens_per_second']:.1f} | "
              f"{s['speedup']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
