"""Target benchmarks: batched padding-aware forward vs a per-sample loop, and the peak memory of
chunked vs full-vocabulary teacher logits. Ratios are against baselines measured in the same run.

    .venv/bin/python bench/target.py
"""
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIXTURE = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-chat-llama")
VOCAB, HIDDEN, POSITIONS, CHUNK = 150_000, 256, 4096, 1024


def bench_forward(repeats: int = 3) -> None:
    from models.registry import TARGETS
    from models.targets.base import TargetConfig

    target = TARGETS.get("hf").load(TargetConfig(path=FIXTURE, dtype="float32"))
    lengths = [512, 37, 300, 128, 451, 64, 200, 90]
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(3, 8192, (n,), generator=g) for n in lengths]
    length = max(lengths)
    batch = {"input_ids": torch.zeros(8, length, dtype=torch.long),
             "position_ids": torch.zeros(8, length, dtype=torch.long),
             "document_ids": torch.full((8, length), -1)}
    for r, s in enumerate(seqs):
        batch["input_ids"][r, :len(s)], batch["position_ids"][r, :len(s)] = s, torch.arange(len(s))
        batch["document_ids"][r, :len(s)] = 0
    singles = [{"input_ids": s[None], "position_ids": torch.arange(len(s))[None],
                "document_ids": torch.zeros(1, len(s), dtype=torch.long)} for s in seqs]
    draft_ids = torch.arange(0, 8192, 4)

    def timed(fn):
        fn()  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - start)
        return best

    loop = timed(lambda: [target(b, draft_ids) for b in singles])
    batched = timed(lambda: target(batch, draft_ids))
    print(f"forward, batch 8, lengths {lengths} ({sum(lengths)} tokens, {torch.get_num_threads()} threads)")
    print(f"  per-sample loop: {loop * 1e3:8.1f} ms   batched: {batched * 1e3:8.1f} ms   "
          f"speed-up x{loop / batched:.2f}")


def peak_logits_memory(mode: str) -> None:
    """Child process: prints the peak RSS increase (MiB) of one teacher-logit computation."""
    from models.targets.teacher import chunked_teacher_logits

    torch.manual_seed(0)
    norm = torch.nn.RMSNorm(HIDDEN, eps=1e-6)
    weight = torch.randn(VOCAB, HIDDEN) * 0.02
    hidden = torch.randn(POSITIONS, HIDDEN)
    draft_ids = torch.arange(0, VOCAB, VOCAB // 32000)[:32000]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if mode == "full":
            logits = torch.nn.functional.linear(norm(hidden), weight).float()
            out = (logits[:, draft_ids], logits.argmax(-1))
        else:
            out = chunked_teacher_logits(hidden, norm, weight, None, draft_ids, CHUNK)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((peak - base) / 1024, out[0].shape[0])


def bench_memory() -> None:
    results = {}
    for mode in ("full", "chunked"):
        proc = subprocess.run([sys.executable, __file__, "--memory", mode], capture_output=True, text=True,
                              check=True)
        results[mode] = float(proc.stdout.split()[-2])
    print(f"teacher logits, V={VOCAB}, H={HIDDEN}, {POSITIONS} positions, draft vocab 32000, fp32 "
          f"(peak RSS increase)")
    print(f"  full: {results['full']:8.1f} MiB   chunked ({CHUNK}/chunk): {results['chunked']:8.1f} MiB   "
          f"ratio full/chunked x{results['full'] / results['chunked']:.2f}")


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--memory":
        peak_logits_memory(sys.argv[2])
    else:
        bench_forward()
        bench_memory()
