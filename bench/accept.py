"""Acceptance benchmark: tau and per-position acceptance of a trained draft vs an untrained one on MT-Bench.

    python bench/accept.py [DRAFT_DIR] [--max-prompts 16] [--max-new-tokens 48] [--temperatures 0 1]

Target: the tiny trained chat Llama fixture (override with --target).  DRAFT_DIR is an Aerie draft dir or a
checkpoint step dir; without it only the untrained baseline is measured.  The untrained draft has the trained
draft's shape and vocabulary (random weights, seed 0), so the ratio isolates what training bought.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft  # noqa: E402
from models.targets.meta import target_spec_from_config  # noqa: E402
from tools.eval.decode import EvalConfig, evaluate_draft, load_target_for_eval  # noqa: E402
from trainer.checkpoint import load_draft  # noqa: E402

FIXTURE = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-chat-llama")


def untrained_like(trained, target_path: str, embed: torch.Tensor, draft_vocab_size: int) -> Eagle3LlamaDraft:
    torch.manual_seed(0)
    if trained is not None:
        draft = Eagle3LlamaDraft(trained.config)
        draft.set_draft_vocab(trained.d2t.cpu(), trained.t2d.cpu())
    else:
        spec = target_spec_from_config({"path": target_path})
        draft = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=draft_vocab_size), spec)
        vd = draft.config.draft_vocab_size  # the lowest ids: a fixed vocabulary without token counts
        draft.set_draft_vocab(torch.zeros(vd, dtype=torch.long), torch.arange(draft.config.vocab_size) < vd)
    draft.load_embedding(embed)
    return draft.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("draft", nargs="?", default="", help="trained draft dir or checkpoint step dir")
    parser.add_argument("--target", default=FIXTURE)
    parser.add_argument("--max-prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--ks", type=int, nargs="+", default=[3, 7])
    parser.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 1.0])
    parser.add_argument("--draft-vocab-size", type=int, default=2048,
                        help="untrained draft without a trained one")
    args = parser.parse_args()

    target, tokenizer = load_target_for_eval(argparse.Namespace(path=args.target, dtype="float32"))
    device = next(target.parameters()).device
    if device.type == "cpu":
        # batch-1 decoding is overhead-bound; more threads only contend on shared cores
        torch.set_num_threads(1)
    embed = target.get_input_embeddings().weight.detach().float().cpu()
    trained = load_draft(args.draft, embed_weight=embed) if args.draft else None
    drafts = {"untrained": untrained_like(trained, args.target, embed, args.draft_vocab_size)}
    if trained is None:
        print("no trained draft given (pass DRAFT_DIR): measuring the untrained baseline only", flush=True)
    else:
        drafts["trained"] = trained
    print(f"target {args.target} on {device}; MT-Bench first turns, {args.max_prompts} prompts, "
          f"{args.max_new_tokens} new tokens, k={args.ks}", flush=True)

    results = {}
    for temperature in args.temperatures:
        for name, draft in drafts.items():
            cfg = EvalConfig(draft=name, prompts="mtbench", max_prompts=args.max_prompts,
                             max_new_tokens=args.max_new_tokens, num_speculative_tokens=list(args.ks),
                             temperature=temperature, seed=0)
            start = time.perf_counter()
            summary = evaluate_draft(target, draft.to(device), tokenizer, cfg)
            print(f"  T={temperature:g} {name}: {time.perf_counter() - start:.1f}s", flush=True)
            for run in summary["results"]:
                results[(temperature, run["num_speculative_tokens"], name)] = run

    columns = list(drafts)
    header = f"{'T':>4} {'k':>2} {'metric':<22}" + "".join(f"{c:>12}" for c in columns)
    header += f"{'ratio':>9}" if "trained" in drafts else ""
    print("\n" + header)
    for temperature in args.temperatures:
        for k in args.ks:
            runs = [results[(temperature, k, c)] for c in columns]
            rows = [("tau", [r["tau"] for r in runs]),
                    ("tokens/target fwd", [r["tokens_per_target_forward"] for r in runs]),
                    ("est. speedup", [r["estimated_speedup"] for r in runs])]
            rows += [(f"accept@{i + 1}", [r["acceptance_per_position"][i] for r in runs]) for i in range(k)]
            for metric, values in rows:
                line = f"{temperature:>4g} {k:>2} {metric:<22}" + "".join(f"{v:>12.3f}" for v in values)
                if len(values) == 2:
                    ratio = (values[1] / values[0] if values[0] > 0
                             else float("inf") if values[1] > 0 else None)
                    line += f"{ratio:>9.2f}" if ratio is not None else f"{'-':>9}"
                print(line)
    untrained_ms = [results[(t, k, "untrained")]["draft_step_ms"] for t in args.temperatures for k in args.ks]
    target_ms = [results[(t, k, "untrained")]["target_forward_ms"]
                 for t in args.temperatures for k in args.ks]
    print(f"\ndraft step {sum(untrained_ms) / len(untrained_ms):.2f} ms, target verify forward "
          f"{sum(target_ms) / len(target_ms):.2f} ms (mean over runs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
