"""Which draft to train?  Eagle3, its EAGLE 3.1 variants and DFlash at an equal training budget, measured by
vLLM.

    .venv/bin/python bench/drafts.py [--variants eagle3,eagle3_1,eagle3_1_nbf,dflash] [--steps 40]
        [--tokens 1024] [--samples 1200] [--prompts 16] [--max-new-tokens 64] [--ks 3,7] [--work DIR]

Each variant trains online on the tiny target for the same number of optimizer steps over micro-batches of the
same token budget (same data, seed, lr schedule and draft vocabulary), so every draft sees the same tokens;
the wall-clock of each training is printed next to it (a second, machine-dependent budget).  Each draft is
exported for vLLM (float32) and served by real vLLM (`tools.vllm.engine.run_vllm`) on MT-Bench first turns at
each of --temperatures (T > 0: vLLM's default verification) and each k of --ks, next to runs of the target
alone.  Printed per variant: training seconds, final
training loss, vLLM τ (1 + accepted / drafts) and per-position acceptance at each k, and vLLM's generated
tokens/s with the draft over without (measured in the same job; CPU timings are noisy, the ratio is what
counts).
Variants:
  eagle3        draft=eagle3_llama, the current default
  eagle3_1      draft=eagle3_1: fc_norm + norm_output (vLLM / speculators EAGLE 3.1)
  eagle3_1_nbf  draft=eagle3_1 draft.norm_before_fc=true (all three switches)
  dflash        draft=dflash: 2 Qwen3 layers, block size 8 (drafts up to 7 tokens in one pass)
Needs vLLM (`make engine`, or AERIE_VLLM_PYTHON / engine.python); run vLLM users one at a time on small
machines.
"""
from __future__ import annotations

import argparse
import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {"eagle3": ["draft=eagle3_llama"], "eagle3_1": ["draft=eagle3_1"],
            "eagle3_1_nbf": ["draft=eagle3_1", "draft.norm_before_fc=true"], "dflash": ["draft=dflash"]}
METHODS = {"dflash": "dflash"}  # vLLM speculative method of each variant; eagle3 otherwise


def aerie(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "tools.cli", *args], cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise SystemExit(f"aerie {' '.join(args)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def train_and_export(name: str, run_dir: Path, args) -> dict:
    """Train (or reuse a finished run in --work) and export; returns its training time and final loss."""
    overrides = [*VARIANTS[name], f"run_dir={run_dir}", f"trainer.max_steps={args.steps}",
                 f"trainer.max_tokens_per_batch={args.tokens}", f"data.max_samples={args.samples}",
                 "data.max_length=512", "data.max_eval_samples=32", "draft.draft_vocab_size=4096",
                 "trainer.lr=2e-3", "trainer.warmup_steps=8", "trainer.eval_every=0", "trainer.ckpt_every=0",
                 "logger.progress=false", f"data.cache_dir={args.work / 'cache'}"]
    started = time.perf_counter()
    aerie("train", *overrides)
    seconds = time.perf_counter() - started
    aerie("export", f"run_dir={run_dir}", "export.format=vllm", "export.dtype=float32")
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    return {"train_seconds": seconds, "elapsed_s": metrics[-1]["elapsed_s"], "loss": metrics[-1]["loss"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=1200)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--ks", default="3,7")
    parser.add_argument("--temperatures", default="0,1",
                        help="T values; T > 0 runs use vLLM's default verification (greedy drafts)")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "bench_drafts")
    parser.add_argument("--vllm-lock", default="",
                        help="a file to flock around the vLLM runs (shared machines)")
    args = parser.parse_args()
    names, ks = args.variants.split(","), [int(k) for k in args.ks.split(",")]
    temps = [float(t) for t in args.temperatures.split(",")]
    unknown = sorted(set(names) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")

    from transformers import AutoTokenizer

    from data.template import render_prompt
    from tools.eval.decode import load_prompts
    from tools.vllm.engine import EngineConfig, run_vllm

    target = str(REPO / "assets" / "tiny-chat-llama")
    trained = {name: train_and_export(name, args.work / name, args) for name in names}
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = [render_prompt(tokenizer, conv) for conv in load_prompts("mtbench", args.prompts)]
    run = {"prompt_token_ids": prompts, "max_new_tokens": args.max_new_tokens, "seed": 0}
    runs = [{**run, "name": f"target@T{t:g}", "temperature": t, "speculative_config": None} for t in temps]
    runs += [{**run, "name": f"{name}@{k}@T{t:g}", "temperature": t, "speculative_config": {
        "method": METHODS.get(name, "eagle3"), "model": str(args.work / name / "export" / "vllm"),
        "num_speculative_tokens": k}} for name in names for k in ks for t in temps]
    with open(args.vllm_lock or os.devnull, "a") as lock:
        if args.vllm_lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
        results = {r["name"]: r for r in run_vllm({"target": target, "runs": runs},
                                                  EngineConfig(name="vllm", max_model_len=1024))["runs"]}
    speed = {name: r["num_generated_tokens"] / r["generate_seconds"] for name, r in results.items()}

    alone = ", ".join(f"T={t:g} {speed[f'target@T{t:g}']:.1f}" for t in temps)
    print(f"budget: {args.steps} steps x {args.tokens} tokens per micro-batch, draft vocab 4096; vLLM "
          f"{len(prompts)} MT-Bench prompts x {args.max_new_tokens} new tokens; target alone tok/s: {alone}")
    print("| draft | train s | loss | T | " + " | ".join(f"τ k={k} | accept@1..3 k={k} | tok/s ratio k={k}"
                                                       for k in ks) + " |")
    print("|" + "---|" * (4 + 3 * len(ks)))
    for name in names:
        for t in temps:
            cells = [name, f"{trained[name]['train_seconds']:.0f}", f"{trained[name]['loss']:.3f}", f"{t:g}"]
            for k in ks:
                r = results[f"{name}@{k}@T{t:g}"]
                tau = 1 + r["num_accepted_tokens"] / max(r["num_drafts"], 1)
                accept = " / ".join(f"{n / max(r['num_drafts'], 1):.2f}"
                                    for n in r["num_accepted_tokens_per_pos"][:3])
                ratio = speed[f"{name}@{k}@T{t:g}"] / speed[f"target@T{t:g}"]
                cells += [f"{tau:.3f}", accept, f"{ratio:.2f}"]
            print("| " + " | ".join(cells) + " |")
    (args.work / "summary.json").write_text(json.dumps({"trained": trained, "vllm": results}, indent=2))


if __name__ == "__main__":
    main()
