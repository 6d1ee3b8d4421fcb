"""What `aerie eval` reports, from either engine: acceptance statistics (tau, per-position rates, tokens per
target forward, speedup), and summary.json / acceptance.csv / acceptance.png."""
from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Dict, List, Sequence


def acceptance_stats(num_steps: int, num_accepted_per_pos: Sequence[int], k: int, num_prompts: int,
                     num_generated_tokens: int) -> dict:
    """The engine-independent part of a run's summary, from counts alone (what vLLM's counters give).

    num_accepted_per_pos[i]: verify steps with at least i + 1 accepted tokens.  tau_std: standard deviation of
    (accepted + 1) over verify steps (the distribution of accepted is fully given by these counts)."""
    counts = [int(c) for c in num_accepted_per_pos] + [0] * (k - len(num_accepted_per_pos))
    nan = float("nan")
    if not num_steps:
        mean, second = nan, nan
    else:  # P(accepted = j) = (counts[j-1] - counts[j]) / steps, counts[-1] = steps
        share = [(a - b) / num_steps for a, b in zip([num_steps] + counts, counts + [0])]
        mean = sum(j * p for j, p in enumerate(share))
        second = sum(j * j * p for j, p in enumerate(share))
    return {
        "num_speculative_tokens": k,
        "tau": 1 + mean,
        "tau_std": max(second - mean * mean, 0.0) ** 0.5 if num_steps else nan,
        "acceptance_per_position": [c / num_steps if num_steps else nan for c in counts],
        "tokens_per_target_forward": (num_generated_tokens / (num_steps + num_prompts)
                                      if num_steps + num_prompts else nan),
        "num_verify_steps": num_steps,
        "num_accepted_per_position": counts,
        "num_generated_tokens": num_generated_tokens,
        "num_prompts": num_prompts,
    }


def summarize(results: list, k: int) -> dict:
    """A run's summary from the DecodeResults of its prompts (engine=hf)."""
    accepted = [a for r in results for a in r.accepted]
    tokens = sum(len(r.tokens) for r in results)
    forwards = sum(r.num_target_forwards for r in results)
    draft_calls = sum(r.num_draft_calls for r in results)
    verify_forwards = forwards - len(results)
    draft_step = sum(r.draft_seconds for r in results) / max(draft_calls, 1)
    target_step = sum(r.verify_seconds for r in results) / max(verify_forwards, 1)
    per_pos = [sum(a >= i + 1 for a in accepted) for i in range(k)]
    stats = acceptance_stats(len(accepted), per_pos, k, len(results), tokens)
    cost = draft_step / target_step if target_step > 0 else float("nan")
    speedup = stats["tau"] / (1 + k * cost) if accepted and cost == cost else float("nan")
    return {**stats, "draft_step_ms": 1e3 * draft_step, "target_forward_ms": 1e3 * target_step,
            "speedup": speedup, "speedup_source": "estimated", "estimated_speedup": speedup}


def summarize_vllm_run(run: dict, k: int, target_tokens_per_second: float) -> dict:
    """A vLLM run's summary (worker result of tools/vllm/engine.py), in the format of `summarize`."""
    if len(run["num_accepted_tokens_per_pos"]) > k or run["num_draft_tokens"] != k * run["num_drafts"]:
        raise RuntimeError(f"vLLM counters do not describe k={k} chains: {run}")
    stats = acceptance_stats(run["num_drafts"], run["num_accepted_tokens_per_pos"], k,
                             len(run["output_token_ids"]), run["num_generated_tokens"])
    assert sum(stats["num_accepted_per_position"]) == run["num_accepted_tokens"], run
    tokens_per_second = run["num_generated_tokens"] / run["generate_seconds"]
    return {**stats, "tokens_per_second": tokens_per_second,
            "target_tokens_per_second": target_tokens_per_second,
            "speedup": tokens_per_second / target_tokens_per_second, "speedup_source": "measured"}


def write_reports(summary: dict, out_dir) -> Dict[str, Path]:
    """summary.json, acceptance.csv (k, position, rate) and acceptance.png, each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from data.io import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "csv": out / "acceptance.csv", "plot": out / "acceptance.png"}
    atomic_write_text(paths["summary"], json.dumps(summary, indent=2) + "\n")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["num_speculative_tokens", "position", "acceptance_rate"])
    figure, axes = plt.subplots(figsize=(6, 4))
    for run in summary["results"]:
        rates = run["acceptance_per_position"]
        writer.writerows([run["num_speculative_tokens"], i + 1, f"{r:.6f}"] for i, r in enumerate(rates))
        axes.plot(range(1, len(rates) + 1), rates, marker="o",
                  label=f"k={run['num_speculative_tokens']} (tau={run['tau']:.2f})")
    atomic_write_text(paths["csv"], text.getvalue())
    axes.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1.02),
             title=f"{summary['prompts']} T={summary['temperature']}")
    axes.legend()
    axes.grid(alpha=0.3)
    tmp = out / ".acceptance.png.tmp"
    figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    tmp.replace(paths["plot"])
    return paths


def eval_summary(cfg, engine: str, runs: List[dict], **extra) -> dict:
    """The one report of both engines; summary.json / acceptance.csv / acceptance.png when cfg.out_dir is
    set."""
    summary = {"engine": engine, "prompts": cfg.prompts, "temperature": cfg.temperature, "verify": cfg.verify,
               "max_new_tokens": cfg.max_new_tokens, "seed": cfg.seed, "draft": cfg.draft, **extra,
               "results": runs}
    if cfg.out_dir:
        summary["files"] = {name: str(path) for name, path in write_reports(summary, cfg.out_dir).items()}
    return summary
