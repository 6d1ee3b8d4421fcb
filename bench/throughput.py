"""Training-step FLOP/s against dense matmul FLOP/s, online and offline, before/after skipping dead work.

    .venv/bin/python bench/throughput.py [--batches 4] [--rounds 2] [--tokens 1024] [--samples 200]

1. Dense fp32 matmul (2048^3) with the process's threads: the machine's reachable FLOP/s.
2. A real `Trainer` (embedded tiny target, k=7, draft vocab 4096, packed ShareGPT rows of --tokens tokens)
   runs
   forward + backward + optimizer step on the same fixed micro-batches with TTT steps >= 1 on every position
   (baseline: `skip_dead=False`) and only on positions with a trained step still ahead (`skip_dead=True`, what
   the trainer runs), interleaved `--rounds` times.  Offline reads a store written by `aerie dump` first.
Useful FLOPs per micro-batch are counted from the shapes (matmuls and attention; the draft's forward x3 for
training, the online target's forward x1): the target on real tokens, draft step 0 on real tokens, steps
>= 1 on the positions whose chain still trains, the draft lm_head on trained positions.  Work elsewhere counts
as waste, so the achieved fraction is useful FLOP/s / matmul FLOP/s.
"""
from __future__ import annotations

import argparse
import functools
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def matmul_flops_per_s(size: int = 2048, repeats: int = 5) -> float:
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def layer_flops(hidden: int, inner: int, heads: int, kv_heads: int, head_dim: int, input_size: int) -> int:
    """Forward matmul FLOPs of one Llama layer per position, attention scores excluded."""
    projections = 2 * input_size * (heads + 2 * kv_heads) * head_dim + 2 * heads * head_dim * hidden
    return projections + 6 * hidden * inner


def useful_flops(batch, spec, draft, ttt_steps: int, online: bool, every_position: bool = False) -> float:
    """Useful training FLOPs of one micro-batch (see the module docstring); every_position: what the baseline
    executes (TTT steps >= 1 on every real position)."""
    import torch

    from models.draft.ttt import valid_positions

    c = draft.config
    docs = batch["document_ids"]
    real = docs >= 0
    context = (batch["position_ids"] + 1).float() * real  # keys each query sees in its document
    valid = [valid_positions(batch["loss_mask"], docs, i) for i in range(ttt_steps)]
    flops = 0.0
    if online:
        per_token = spec.num_layers * layer_flops(spec.hidden_size, spec.intermediate_size,
                                                  spec.num_attention_heads, spec.num_key_value_heads,
                                                  spec.head_dim, spec.hidden_size)
        per_token += 2 * spec.hidden_size * spec.vocab_size  # teacher logits (argmax over the full vocab)
        scores = spec.num_layers * 4 * spec.num_attention_heads * spec.head_dim * float(context.sum())
        flops += per_token * float(real.sum()) + scores
    alive = torch.zeros_like(valid[0])
    draft_fwd = 0.0
    for step in reversed(range(ttt_steps)):
        alive = alive | valid[step]
        positions = real if step == 0 or every_position else alive
        count = float(positions.sum())
        draft_fwd += count * sum(layer_flops(c.hidden_size, c.intermediate_size, c.num_attention_heads,
                                             c.num_key_value_heads, c.head_dim,
                                             (2 if i == 0 else 1) * c.hidden_size)
                                 for i in range(c.num_layers))
        keys_seen = float((context * positions).sum()) + step * count
        draft_fwd += c.num_layers * 4 * c.num_attention_heads * c.head_dim * keys_seen
        draft_fwd += 2 * c.hidden_size * c.draft_vocab_size * float(valid[step].sum())
    draft_fwd += 2 * c.num_aux_layers * c.target_hidden_size * c.hidden_size * float(real.sum())  # fc
    return flops + 3 * draft_fwd


def overrides(run_dir: str, args, mode: str) -> list:
    return [f"run_dir={run_dir}", f"data.cache_dir={args.cache}", f"data.max_samples={args.samples}",
            "data.max_length=512", f"trainer.max_tokens_per_batch={args.tokens}",
            "draft.draft_vocab_size=4096",
            "draft.ttt_steps=7", f"trainer.mode={mode}", "trainer.eval_every=0", "trainer.ckpt_every=0",
            "logger.progress=false", "trainer.resume=never", "trainer.max_steps=1000", "store.layout=compact"]


def measure(cfg, args) -> dict:
    """Seconds per variant over the same micro-batches, and their useful FLOPs."""
    import models.objectives.ttt as ttt_objective
    from trainer.train import Trainer, _to_device

    trainer = Trainer(cfg)
    batches = [next(trainer.data.train_batches) for _ in range(args.batches + 1)]
    online = cfg.trainer.mode == "online"
    steps = cfg.draft.ttt_steps
    flops = sum(useful_flops(b, trainer.spec, trainer.draft, steps, online) for b in batches[1:])
    executed = sum(useful_flops(b, trainer.spec, trainer.draft, steps, online, every_position=True)
                   for b in batches[1:])
    original = ttt_objective.ttt_forward
    variants = {"baseline": functools.partial(original, skip_dead=False), "skip_dead": original}
    seconds = dict.fromkeys(variants, 0.0)
    trainer.engine.train()
    for round_index in range(args.rounds):
        for name, forward in variants.items():
            ttt_objective.ttt_forward = forward
            for index, batch in enumerate(batches):
                start = time.perf_counter()
                out = trainer.engine(_to_device(batch, trainer.device))
                trainer.engine.backward(out.loss)
                trainer.engine.step()
                if index > 0:  # the first batch warms the variant up
                    seconds[name] += time.perf_counter() - start
    ttt_objective.ttt_forward = original
    return {"flops": flops * args.rounds, "seconds": seconds, "useful_of_baseline": flops / executed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--modes", default="online,offline")
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "aerie-bench-cache"))
    parser.add_argument("--store", default="", help="offline: an existing store (<run_dir>/store) to read")
    args = parser.parse_args()
    import torch
    from hydra import compose, initialize_config_dir

    from tools.config import register_configs

    register_configs()
    peak = matmul_flops_per_s()
    print(f"dense fp32 matmul 2048^3: {peak / 1e9:.1f} GFLOP/s on {torch.get_num_threads()} threads")
    root = Path(tempfile.mkdtemp(prefix="aerie-bench-throughput-"))
    print(f"{'mode':8} {'variant':10} {'s/step':>7} {'useful GFLOP/s':>15} {'of matmul':>10} {'speed-up':>9}")
    modes = args.modes.split(",")
    if "offline" in modes and not args.store:  # dumped before this process starts a process group
        dump = [str(Path(sys.executable).parent / "aerie"), "dump", *overrides(str(root / "offline"), args,
                                                                               "online")]
        proc = subprocess.run(dump, cwd=REPO, capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"aerie dump failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    for mode in modes:
        run_dir = str(root / mode)
        if mode == "offline" and args.store:
            run_dir = str(Path(args.store).parent)  # a store another bench dumped (same data settings)
        with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
            extra = [f"store.path={args.store}"] if mode == "offline" and args.store else []
            cfg = compose(config_name="train", overrides=overrides(run_dir, args, mode) + extra)
        result = measure(cfg, args)
        base = result["seconds"]["baseline"]
        for name, seconds in result["seconds"].items():
            rate = result["flops"] / seconds
            print(f"{mode:8} {name:10} {seconds / (args.batches * args.rounds):>7.3f} {rate / 1e9:>15.1f} "
                  f"{rate / peak:>10.2f} {base / seconds:>9.2f}")
        print(f"{mode:8} the baseline's FLOPs are {1 / result['useful_of_baseline']:.2f}x the useful ones")
        # matmul rate again: the machine is shared, so read the fractions against both
        print(f"         dense matmul now {matmul_flops_per_s() / 1e9:.1f} GFLOP/s")


if __name__ == "__main__":
    main()
