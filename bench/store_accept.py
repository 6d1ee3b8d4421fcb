"""Does the compact hidden-state store cost acceptance?  Store variants end to end against the full (8·H) layout.

    .venv/bin/python bench/store_accept.py [--variants full,compact] [--seeds 0,1] [--temperatures 0,1]
        [--steps 60] [--samples 400] [--prompts 16] [--max-new-tokens 48] [--work DIR]

For each variant: `aerie dump` (once; a --work dir from an earlier run is reused, the dump resumes), then per seed
an offline `aerie train` with identical settings and `aerie eval` (speculative decoding with the tiny target on
MT-Bench, k=3) at each temperature.  Runs the checkout this file is in (`python -m trainer.cli`).  Variants:
  full          bf16 aux + bf16 last hidden state (teacher recomputed through the target's norm + lm_head)
  compact       the default compact layout: fp8 aux + top-k log-probs + tail samples
  compact-topk  compact without tail samples (store version 1): the teacher renormalised over the top-k
  full-fp8aux   the full store with its aux states sent through the compact layout's fp8 quantisation
                (ablation; on disk bf16, bytes counted as if fp8)
Prints bytes/token (measured at the tiny target's H, and the layout formula at H=4096, V=128256), τ per
temperature (mean over seeds) and the ratio to full.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from data.store import (HiddenStateStoreReader, HiddenStateStoreWriter, bytes_per_token,  # noqa: E402
                        dequantize_fp8, quantize_fp8)

# name -> (dump overrides, derived from another variant's store or None)
VARIANTS = {
    "full": (["store.layout=full"], None),
    "compact": (["store.layout=compact"], None),
    "compact-topk": (["store.layout=compact", "store.tail_samples=0"], None),
    "full-fp8aux": (["store.layout=full"], "full"),
}


def aerie(*args: str) -> None:
    out = subprocess.run([sys.executable, "-m", "trainer.cli", *args], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"aerie {args[0]} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")


def fp8_aux_copy(src: Path, dst: Path) -> None:
    """A full-layout copy of store `src` whose aux states went through quantize_fp8 / dequantize_fp8."""
    for split in ("train", "eval"):
        if (dst / split / "manifest.json").is_file():
            continue
        reader = HiddenStateStoreReader(str(src / split))
        m = reader.manifest
        writer = HiddenStateStoreWriter(str(dst / split), "full", m["hidden_size"], m["num_aux_layers"],
                                        m["aux_layer_ids"], m["vocab_size"], m["target_fingerprint"],
                                        dataset_fingerprint=m["dataset_fingerprint"])
        for s in reader:
            aux = dequantize_fp8(*quantize_fp8(s["aux_hidden_states"], m["num_aux_layers"]))
            writer.add(s["input_ids"], s["loss_mask"], aux, last_hidden_state=s["last_hidden_state"],
                       sample_id=s["id"])
        writer.close()


def layout_bytes(name: str, manifest: dict, hidden: int, vocab: int) -> int:
    """Bytes/token of the variant's format (ids and mask included) at hidden size `hidden`."""
    aux = manifest["num_aux_layers"]
    if name == "full-fp8aux":
        return aux * hidden + 4 * aux + 2 * hidden + 5
    return bytes_per_token(manifest["layout"], hidden, aux, vocab, manifest.get("topk") or 16,
                           tail_samples=manifest.get("tail_samples", 0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="full,compact")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--temperatures", default="0,1")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--samples", type=int, default=400)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--work", default="", help="working dir (kept); default: a new temporary dir")
    args = parser.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or "full" not in names:
        raise SystemExit(f"--variants must include full and come from {sorted(VARIANTS)}; got {names}")
    seeds = [int(s) for s in args.seeds.split(",")]
    temperatures = [float(t) for t in args.temperatures.split(",")]
    root = Path(args.work or tempfile.mkdtemp(prefix="aerie-bench-store-"))
    common = ["experiment=quickstart", f"data.cache_dir={root / 'cache'}", f"data.max_samples={args.samples}",
              f"trainer.max_steps={args.steps}", "trainer.eval_every=0", "trainer.ckpt_every=0", "logger.progress=false"]
    results = {}
    for name in names:
        overrides, source = VARIANTS[name]
        variant_dir = root / name
        store = variant_dir / "store"
        if source is None:
            aerie("dump", *common, *overrides, f"run_dir={variant_dir}")
        else:
            fp8_aux_copy(root / source / "store", store)
        manifest = json.loads((store / "train" / "manifest.json").read_text())
        tokens = sum(manifest["sample_lengths"])
        measured = sum(p.stat().st_size for p in (store / "train").glob("*.safetensors")) / tokens
        if source is not None:
            measured = layout_bytes(name, manifest, manifest["hidden_size"], manifest["vocab_size"])
        taus = {t: [] for t in temperatures}
        for seed in seeds:
            run_dir = variant_dir / f"seed-{seed}"
            train = [*common, *overrides, f"run_dir={run_dir}", f"store.path={store}", f"seed={seed}"]
            if not (run_dir / "final").is_dir():
                aerie("train", *train, "trainer.mode=offline")
            for t in temperatures:
                out = run_dir / f"eval-T{t:g}"
                if not (out / "summary.json").is_file():
                    aerie("eval", *train, f"eval.out_dir={out}", f"eval.max_prompts={args.prompts}",
                          f"eval.max_new_tokens={args.max_new_tokens}", "eval.num_speculative_tokens=[3]",
                          f"eval.temperature={t}")
                taus[t].append(json.loads((out / "summary.json").read_text())["results"][0]["tau"])
        hidden = manifest["hidden_size"]
        results[name] = {"hidden": hidden, "measured": measured, "taus": taus,
                         "at_4096": layout_bytes(name, manifest, 4096, 128256) / 4096}
        print(f"  done {name}: {json.dumps(taus)}", file=sys.stderr, flush=True)
    print(f"offline training from each store variant: {args.samples} conversations, {args.steps} steps, seeds {seeds}; "
          f"eval MT-Bench {args.prompts} prompts x {args.max_new_tokens} tokens, k=3  (work dir {root})")
    full = results["full"]
    for name, r in results.items():
        cells = []
        for t, values in r["taus"].items():
            mean = sum(values) / len(values)
            ref = sum(full["taus"][t]) / len(full["taus"][t])
            spread = f" [{' '.join(f'{v:.3f}' for v in values)}]" if len(values) > 1 else ""
            cells.append(f"T={t:g} tau {mean:.3f}{spread} x{mean / ref:.3f}")
        print(f"  {name:13} {r['measured']:6.0f} B/token = {r['measured'] / r['hidden']:.2f}*H (H={r['hidden']}), "
              f"{r['at_4096']:.2f}*H at H=4096 | " + " | ".join(cells))
    print("goal: compact within 2% of full (ratio >= 0.98) at <= 3.5*H bytes/token")


if __name__ == "__main__":
    main()
