"""Objectives, noise augmentation and the draft head's start compared at equal budget: the acceptance of the
drafts they train.

    .venv/bin/python bench/objective.py [--steps 40] [--tokens 1024] [--seeds 0,1] [--variants all]
        [--mode offline|online] [--ttt-steps 7] [--lr 2e-3] [--decode-prompts 8]
        [--vllm-prompts 30 --vllm-k 3,7 --vllm-temperatures 0,1] [key=value ...]

Offline (default): one `aerie dump` of the embedded tiny target's hidden states (compact store), then per
variant and seed an offline run of --steps optimizer steps of --tokens tokens (--ttt-steps TTT, draft vocab
4096), all in this process.  --mode online runs the target inside each step instead (the quickstart's mode).
Trailing key=value overrides apply to every run; a variant is a name in VARIANTS or ad hoc,
NAME:key=value+key=value.
Each draft is scored on the held-out split, teacher-forced (no sampling noise): per TTT step the share of
positions where the draft's argmax is the target's (T=0) and the acceptance sum_v min(p_v, q_v) of
speculative sampling with the draft's own q (T=1); τ = 1 + sum_i prod_{j<=i} a_j at k=3 and k=7.
--decode-prompts N also decodes N MT-Bench prompts (64 new tokens, k=3, T=0) with the HF target (`aerie
eval`'s decoder).  --vllm-prompts N exports each draft (vllm format) and serves it with real vLLM (one worker,
tools/vllm/engine.py, under flock /tmp/aerie-vllm.lock) on N MT-Bench prompts x 128 new tokens at each k and T
(T > 0: vLLM's default verification): τ = 1 + accepted / drafts from vLLM's own counters.  Prints the means
over seeds and their ratios against soft cross-entropy.  Runs resume (a rerun with the same --work only scores
what is missing).
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "soft_ce": [],
    "lk": ["objective.loss=lk"],
    "lk_hybrid": ["objective.loss=lk_hybrid"],
    "soft_ce+top1": ["objective.top1_weight=0.5"],
    "soft_ce+noise": ["objective.noise_std=0.05"],
    "lk_hybrid+noise": ["objective.loss=lk_hybrid", "objective.noise_std=0.05"],
    "random_head": ["draft.init_head=random"],  # norm + lm_head from scratch instead of the target's
}


def base_overrides(args, store_dir: str) -> list:
    return [f"data.cache_dir={args.cache}", f"data.max_samples={args.samples}", "data.max_length=512",
            "data.max_eval_samples=48", f"trainer.max_tokens_per_batch={args.tokens}",
            "draft.draft_vocab_size=4096", f"draft.ttt_steps={args.ttt_steps}", f"trainer.lr={args.lr}",
            f"trainer.warmup_steps={max(1, args.steps // 10)}",
            "trainer.eval_every=0", "trainer.ckpt_every=0", "logger.progress=false", "trainer.resume=auto",
            f"store.path={store_dir}", "store.layout=compact", "trainer.eval_max_batches=1000",
            f"trainer.mode={args.mode}", *args.overrides]


def train_and_score(args, store_dir: str, name: str, seed: int, decode_prompts) -> dict:
    from hydra import compose, initialize_config_dir

    from models.objectives.base import chain_tau
    from trainer.train import Trainer

    run_dir, extra = Path(args.work) / f"{name.split(':')[0]}-{seed}", VARIANTS[name]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="train", overrides=[
            *base_overrides(args, store_dir), f"run_dir={run_dir}", f"seed={seed}",
            f"trainer.max_steps={args.steps}", *extra])
    trainer = Trainer(cfg)
    trainer.fit()
    train_s = read_elapsed(run_dir)  # the training's own wall-clock (also for a run finished earlier)
    metrics = trainer.evaluate()
    acc = [metrics[f"acc_{i}"] for i in range(args.ttt_steps)]
    accept = [metrics[f"accept_{i}"] for i in range(args.ttt_steps)]
    scores = {"tf_t0_k3": chain_tau(acc[:3]), "tf_t1_k3": chain_tau(accept[:3]), "train_s": train_s}
    if args.ttt_steps >= 7:
        scores.update(tf_t0_k7=chain_tau(acc[:7]), tf_t1_k7=chain_tau(accept[:7]))
    if decode_prompts:
        scores["decode_t0_k3"] = decode_tau(trainer.draft, decode_prompts)
    if args.vllm_prompts and (args.vllm_variants == "all" or name in args.vllm_variants.split(",")):
        from omegaconf import open_dict

        from tools.export.base import run_export

        with open_dict(cfg):
            cfg.export.format, cfg.export.dtype = "vllm", "float32"
        scores["export"] = str(run_export(cfg))
    return scores


def read_elapsed(run_dir: Path) -> float:
    import json

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return float(json.loads(lines[-1])["elapsed_s"]) if lines else float("nan")


def vllm_taus(exports: dict, num_prompts: int, ks=(3,), temperatures=(0.0,)) -> dict:
    """{(run name, k, T): vLLM τ} for each exported draft, k and T (T > 0: vLLM's default verification), in
    one vLLM worker process."""
    import fcntl

    from transformers import AutoTokenizer

    from data.template import render_prompt
    from tools.eval.decode import load_prompts
    from tools.vllm.engine import EngineConfig, run_vllm

    target = str(REPO / "assets" / "tiny-chat-llama")
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompts = [render_prompt(tokenizer, conv) for conv in load_prompts("mtbench", num_prompts)]
    runs = [{"name": f"{name}@{k}@{t:g}", "prompt_token_ids": prompts, "max_new_tokens": 128,
             "temperature": t, "seed": 0,
             "speculative_config": {"method": "eagle3", "model": path, "num_speculative_tokens": k}}
            for name, path in exports.items() for k in ks for t in temperatures]
    with open("/tmp/aerie-vllm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = run_vllm({"target": target, "runs": runs}, EngineConfig(name="vllm", max_model_len=2048))
    return {tuple(r["name"].split("@")): 1 + r["num_accepted_tokens"] / max(r["num_drafts"], 1)
            for r in result["runs"]}


def decode_tau(draft, decode) -> float:
    import torch

    from tools.eval.decode import SpeculativeDecoder
    from tools.eval.report import summarize

    target, prompts, eos = decode
    decoder = SpeculativeDecoder(target, draft.float().eval())
    with torch.no_grad():
        results = [decoder.generate(ids, 64, 3, 0.0, None, eos) for ids in prompts]
    return summarize(results, 3)["tau"]


def load_decoder_inputs(num_prompts: int):
    from types import SimpleNamespace

    from data.template import render_prompt
    from tools.eval.decode import eos_ids, load_prompts, load_target_for_eval

    target, tokenizer = load_target_for_eval(SimpleNamespace(path=str(REPO / "assets" / "tiny-chat-llama"),
                                                             dtype="float32", trust_remote_code=False))
    prompts = [render_prompt(tokenizer, conv) for conv in load_prompts("mtbench", num_prompts)]
    return target, prompts, eos_ids(tokenizer, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=600)
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--variants", default="all",
                        help="comma-separated names, or ad-hoc NAME:key=value+key=value")
    parser.add_argument("--decode-prompts", type=int, default=0)
    parser.add_argument("--vllm-prompts", type=int, default=0)
    parser.add_argument("--vllm-variants", default="all")
    parser.add_argument("--vllm-k", default="3", help="k values vLLM serves each draft at")
    parser.add_argument("--vllm-temperatures", default="0", help="T values vLLM serves each draft at")
    parser.add_argument("--ttt-steps", type=int, default=7)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--mode", choices=("offline", "online"), default="offline",
                        help="online: the target runs in each step (the quickstart's mode), no store")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every run (key=value)")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "aerie-bench-cache"))
    parser.add_argument("--work", default="", help="working dir (kept); default: a new temporary dir")
    args = parser.parse_args()
    names = list(VARIANTS) if args.variants == "all" else args.variants.split(",")
    for name in [n for n in names if ":" in n]:  # an ad-hoc variant, name:key=value+key=value
        VARIANTS[name] = name.split(":", 1)[1].split("+")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    from tools.config import register_configs

    register_configs()
    work = Path(args.work or tempfile.mkdtemp(prefix="aerie-bench-objective-"))
    args.work = str(work)
    store = work / "store"
    if args.mode == "offline" and not (store / "train" / "manifest.json").is_file():
        subprocess.run([str(Path(sys.executable).parent / "aerie"), "dump", *base_overrides(args, str(store)),
                        f"run_dir={work / 'dump'}"], cwd=REPO, check=True, capture_output=True)
    decode = load_decoder_inputs(args.decode_prompts) if args.decode_prompts else None
    seeds = [int(s) for s in args.seeds.split(",")]
    scored = {(name, seed): train_and_score(args, str(store), name, seed, decode)
              for name in names for seed in seeds}
    if args.vllm_prompts:
        exports = {f"{name}-{seed}": run.pop("export")
                   for (name, seed), run in scored.items() if "export" in run}
        ks = [int(k) for k in args.vllm_k.split(",")]
        temps = [float(t) for t in args.vllm_temperatures.split(",")]
        taus = vllm_taus(exports, args.vllm_prompts, ks, temps)
        for (name, seed), run in scored.items():
            for k in ks:
                for t in temps:
                    run[f"vllm_t{t:g}_k{k}"] = taus.get((f"{name}-{seed}", str(k), f"{t:g}"), float("nan"))
    results = {}
    for name in names:
        runs = [scored[(name, seed)] for seed in seeds]
        results[name] = {key: statistics.mean(run[key] for run in runs) for key in runs[0]}
        print(f"{name}: " + ", ".join(f"{k}={[round(r[k], 4) for r in runs]}" for k in runs[0]), flush=True)
    keys = list(next(iter(results.values())))
    base = results.get("soft_ce")
    print(f"\n{args.steps} steps x {args.tokens} tokens, {args.mode}, k={args.ttt_steps} TTT, seeds {seeds}; "
          f"teacher-forced τ "
          f"(tf) on the held-out split"
          f"{', decoded τ on %d MT-Bench prompts' % args.decode_prompts if decode else ''}")
    print(f"{'variant':16} " + " ".join(f"{k:>15}" for k in keys))
    for name, scores in results.items():
        cells = [f"{scores[k]:.3f}" + (f" ({scores[k] / base[k]:.3f}x)" if base else "") for k in keys]
        print(f"{name:16} " + " ".join(f"{c:>15}" for c in cells))


if __name__ == "__main__":
    main()
