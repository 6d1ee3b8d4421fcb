"""One TTT training step (forward + backward, k=7) with lean vs naive dense-mask attention.

Each (variant, L) runs in its own subprocess, which reports the step time and its peak-RSS growth during the
step (ru_maxrss after - before).  Tiny config like the tiny target: hidden 256, 8 heads / 4 kv heads, vocab
8192, draft vocab 2048, B=1.  Prints lean/naive ratios.  The naive run is skipped when its memory,
extrapolated quadratically from the previous length, would not fit in the available memory.

    .venv/bin/python bench/ttt.py [--lengths 512 2048 4096] [--steps 7]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from types import SimpleNamespace

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_one(attention: str, length: int, steps: int) -> dict:
    import torch

    from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft
    from models.draft.ttt import ttt_forward

    spec = SimpleNamespace(
        hidden_size=256, intermediate_size=768, vocab_size=8192, num_attention_heads=8, num_key_value_heads=4,
        head_dim=32, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=8192,
        aux_layer_ids=[2, 4, 5],
    )
    torch.manual_seed(0)
    draft = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=2048, attention=attention), spec)

    def batch(n):
        return dict(
            input_ids=torch.randint(0, 8192, (1, n)),
            aux_hidden_states=torch.randn(1, n, 3 * 256),
            teacher_logits=torch.randn(1, n, 2048),
            teacher_argmax=torch.randint(0, 8192, (1, n)),
            loss_mask=torch.ones(1, n, dtype=torch.long),
            position_ids=torch.arange(n)[None],
            document_ids=torch.zeros(1, n, dtype=torch.long),
        )

    def train_step(inputs):
        out = ttt_forward(draft, **inputs, ttt_steps=steps)
        out.loss.backward()
        draft.zero_grad(set_to_none=True)

    train_step(batch(64))  # warm-up
    inputs = batch(length)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    train_step(inputs)
    seconds = time.perf_counter() - start
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    return {"seconds": seconds, "peak_mib": peak_kib / 1024}


def available_mib() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def measure(attention: str, length: int, steps: int) -> dict:
    command = [sys.executable, __file__, "--child", attention, str(length), "--steps", str(steps)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096])
    parser.add_argument("--steps", type=int, default=7)
    parser.add_argument("--child", nargs=2, metavar=("ATTENTION", "LENGTH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args.steps)))
        return
    print(f"TTT step fwd+bwd, k={args.steps}, hidden 256, 8/4 heads, vocab 8192, draft vocab 2048, B=1, "
          f"{os.cpu_count()} CPUs")
    header = ("L", "lean s", "naive s", "time ratio", "lean MiB", "naive MiB", "mem ratio")
    print("{:>6} {:>8} {:>8} {:>10} {:>9} {:>10} {:>9}".format(*header))
    naive_previous = None
    for length in args.lengths:
        lean = measure("lean", length, args.steps)
        naive = None
        if naive_previous is not None:
            expected = naive_previous[1] * (length / naive_previous[0]) ** 2
            if expected > 0.8 * available_mib():
                print(f"{length:>6} {lean['seconds']:>8.2f} {'skipped':>8} {'-':>10} "
                      f"{lean['peak_mib']:>9.0f} {'~%.0f?' % expected:>10} {'-':>9}  "
                      f"(naive would need ~{expected:.0f} MiB)")
                continue
        naive = measure("dense", length, args.steps)
        naive_previous = (length, naive["peak_mib"])
        time_ratio, memory_ratio = lean["seconds"] / naive["seconds"], lean["peak_mib"] / naive["peak_mib"]
        print(f"{length:>6} {lean['seconds']:>8.2f} {naive['seconds']:>8.2f} {time_ratio:>10.3f} "
              f"{lean['peak_mib']:>9.0f} {naive['peak_mib']:>10.0f} {memory_ratio:>9.3f}")


if __name__ == "__main__":
    main()
