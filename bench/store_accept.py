"""Does the compact hidden-state store cost acceptance?  Full (8·H) vs compact (≈3.3·H) layout, end to end.

    .venv/bin/python bench/store_accept.py [--steps 60] [--samples 400]

For each layout: `aerie dump`, offline `aerie train` with identical settings and seed, then `aerie eval`
(speculative decoding with the tiny target on MT-Bench).  Prints bytes/token and τ of both, and the ratio.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def aerie(*args: str) -> None:
    out = subprocess.run([str(Path(sys.executable).parent / "aerie"), *args], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"aerie {args[0]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--temperature", type=float, default=1.0)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="aerie-bench-store-"))
    results = {}
    for layout in ("full", "compact"):
        run_dir = root / layout
        common = ["experiment=quickstart", f"run_dir={run_dir}", f"data.cache_dir={root / 'cache'}",
                  f"data.max_samples={args.samples}", f"trainer.max_steps={args.steps}", "trainer.eval_every=0",
                  "trainer.ckpt_every=0", "logger.progress=false", f"store.layout={layout}"]
        aerie("dump", *common)
        aerie("train", *common, "trainer.mode=offline")
        aerie("eval", *common, f"eval.max_prompts={args.prompts}", "eval.max_new_tokens=48",
              "eval.num_speculative_tokens=[3]", f"eval.temperature={args.temperature}")
        summary = json.loads((run_dir / "eval" / "summary.json").read_text())["results"][0]
        store = run_dir / "store" / "train"
        manifest = json.loads((store / "manifest.json").read_text())
        size = sum(p.stat().st_size for p in store.glob("*.safetensors"))
        results[layout] = {"tau": summary["tau"], "bytes_per_token": size / sum(manifest["sample_lengths"]),
                           "hidden": manifest["hidden_size"]}
    full, compact = results["full"], results["compact"]
    print(f"offline training from each store layout: {args.samples} conversations, {args.steps} steps; "
          f"eval MT-Bench {args.prompts} prompts, k=3, T={args.temperature}")
    for name, r in results.items():
        print(f"  {name:8} {r['bytes_per_token']:8.0f} B/token = {r['bytes_per_token'] / r['hidden']:.2f}*H   "
              f"tau {r['tau']:.3f}")
    print(f"  compact/full: bytes {compact['bytes_per_token'] / full['bytes_per_token']:.3f}, "
          f"tau {compact['tau'] / full['tau']:.4f} (goal: within 2%)")


if __name__ == "__main__":
    main()
