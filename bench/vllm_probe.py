"""Where vLLM's T > 0 acceptance comes from: what reaches its rejection sampler, next to Aerie's own decoder.

    python bench/vllm_probe.py DRAFT_DIR [--max-prompts 16] [--max-new-tokens 64] [--k 3] [--temperature 1]

Serves the draft's vllm export in real vLLM (bench/vllm_probe_worker.py: one worker, one LLM per run) with
draft_sample_method greedy and probabilistic, each as vLLM ships and with the worker's fix of its CPU
temperature expansion.  Per draft position, over the draft tokens vLLM verified (so given the earlier ones
were accepted): vLLM's acceptance rate; the mean min(1, p(x)/q(x)) of the p and q its sampler was handed (the
rate that sampler must give); the mean Σ_v min(p, q) (what exact speculative sampling accepts when x ~ q); the
mean q(x); and the sampler calls without draft probabilities.  Then Aerie's decoder on the same export,
prompts, k and T with eval.verify=exact and target_only.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from accept import FIXTURE  # noqa: E402

from data.template import render_prompt  # noqa: E402
from tools.eval.decode import EvalConfig, evaluate_draft, load_prompts  # noqa: E402
from tools.export.base import export, is_engine_export, load_export  # noqa: E402
from tools.vllm import engine as vllm_engine  # noqa: E402

PROBE_WORKER = ROOT / "bench" / "vllm_probe_worker.py"
MODES = ("greedy", "probabilistic")


def probe_job(export_dir, target: str, prompts, k: int, temperature: float, max_new_tokens: int,
              modes=MODES, fixes=(False, True), seed: int = 0) -> dict:
    """The probe worker's job: one run per vLLM draft_sample_method and fix of vLLM's CPU expand_kernel."""
    runs = [{"name": f"{mode}{' fixed' if fix else ''}", "prompt_token_ids": prompts, "fix_cpu_expand": fix,
             "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
             "speculative_config": {"method": "eagle3", "model": str(export_dir), "num_speculative_tokens": k,
                                    "draft_sample_method": mode}} for fix in fixes for mode in modes]
    return {"target": target, "runs": runs, "worker_dir": str(vllm_engine.WORKER.parent)}


def position_rows(probe: dict) -> list:
    """Per position: (verified, acceptance, mean min(1, p/q), mean Σ min(p, q) or nan, mean q(x) or nan)."""
    nan = float("nan")
    rows = []
    for stats in probe["positions"]:
        n, with_q = stats["num_tokens"], stats["num_with_q"]
        mean = [stats[key] / n if n else nan for key in ("sum_accepted", "sum_min_ratio")]
        mean += [stats[key] / with_q if with_q else nan for key in ("sum_overlap", "sum_q_of_x")]
        rows.append((int(n), *mean))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("draft", help="an Aerie draft dir (exported for vLLM here) or a vllm export")
    parser.add_argument("--target", default=FIXTURE)
    parser.add_argument("--max-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--k", type=int, default=3)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.target)
    prompts = [render_prompt(tokenizer, conv) for conv in load_prompts("mtbench", args.max_prompts)]
    with tempfile.TemporaryDirectory(prefix="aerie-probe-") as tmp:
        out = Path(args.draft)
        if not is_engine_export(out):
            out = export(args.draft, Path(tmp) / "vllm", "vllm", target=args.target, dtype="float32")
        job = probe_job(out, args.target, prompts, args.k, args.temperature, args.max_new_tokens)
        engine = vllm_engine.EngineConfig(name="vllm", max_model_len=2048)
        result = vllm_engine.run_vllm(job, engine, worker=PROBE_WORKER)
        target = AutoModelForCausalLM.from_pretrained(args.target, dtype=torch.float32).eval()
        draft = load_export(out, "vllm", target.get_input_embeddings().weight.detach().float())
        aerie = {}
        for verify in ("exact", "target_only"):
            cfg = EvalConfig(draft=str(out), max_prompts=args.max_prompts, max_new_tokens=args.max_new_tokens,
                             num_speculative_tokens=args.k, temperature=args.temperature, verify=verify)
            aerie[verify] = evaluate_draft(target, draft, tokenizer, cfg)["results"][0]
    print(f"{args.max_prompts} MT-Bench prompts x {args.max_new_tokens} new tokens, k={args.k}, "
          f"T={args.temperature:g}")
    print("| vLLM draft_sample_method | position | verified | accepted | mean min(1,p/q) | mean Σmin(p,q) | "
          "mean q(x) | calls without q |")
    print("|---|---|---|---|---|---|---|---|")
    for run in result["runs"]:
        probe = run["probe"]
        for i, (n, acc, ratio, overlap, q_x) in enumerate(position_rows(probe)):
            print(f"| {run['name']} | {i + 1} | {n} | {acc:.3f} | {ratio:.3f} | {overlap:.3f} | {q_x:.3f} | "
                  f"{probe['num_calls_without_draft_probs']}/{probe['num_calls']} |")
        tau = 1 + run["num_accepted_tokens"] / max(run["num_drafts"], 1)
        print(f"| {run['name']} | tau | {run['num_drafts']} drafts | {tau:.3f} | | | | |")
    for verify, run in aerie.items():
        reached = [run["num_verify_steps"]] + run["num_accepted_per_position"]
        rates = " / ".join(f"{a / r:.3f}" if r else "nan" for r, a in zip(reached, reached[1:]))
        print(f"Aerie eval.verify={verify}: tau {run['tau']:.3f}, acceptance per position given reached "
              f"{rates} ({run['num_verify_steps']} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
