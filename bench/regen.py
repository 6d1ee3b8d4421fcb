"""Regeneration throughput through a real `vllm serve` (launch/vllm/serve.sh): conversations per minute and
completion tokens per second of `aerie regen` at concurrency 1, 4 and 16, each as a ratio over concurrency 1,
all against one server started by this script.

    .venv/bin/python bench/regen.py [--num-conversations 48] [--max-tokens 64] [--target assets/tiny-chat-llama]

The conversations are the first ones of the packaged ShareGPT (every user turn replayed, temperatures 0 / 0.7 / 1
mixed as `aerie regen` does by default); each concurrency writes its own output directory.  Throughput counts every
settled conversation (written or rejected: with the tiny target most replies reach max_tokens, which still costs
the server the full generation).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.regen import RegenConfig, VllmServer, run_regen  # noqa: E402
from data.sources import DataConfig  # noqa: E402
from tools.vllm.engine import vllm_python  # noqa: E402

FIXTURE = str(Path(__file__).resolve().parents[1] / "assets" / "tiny-chat-llama")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default=FIXTURE)
    parser.add_argument("--num-conversations", type=int, default=48)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    args = parser.parse_args()
    data_cfg = DataConfig(max_samples=args.num_conversations)
    with tempfile.TemporaryDirectory(prefix="aerie-bench-regen-") as tmp:
        server = VllmServer(args.target, 0, vllm_python(), os.path.join(tmp, "serve.log"),
                            ["--max-model-len", "2048", "--max-num-seqs", str(max(args.concurrency))],
                            {"VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")})
        server.start()
        try:
            rows = []
            for concurrency in args.concurrency:
                cfg = RegenConfig(base_urls=[server.url], output_dir=os.path.join(tmp, f"c{concurrency}"),
                                  concurrency=concurrency, max_tokens=args.max_tokens)
                start = time.perf_counter()
                stats = run_regen(cfg, data_cfg)
                seconds = time.perf_counter() - start
                settled = args.num_conversations - stats["failed"]
                rows.append((concurrency, settled / seconds * 60, stats["completion_tokens"] / seconds, stats))
        finally:
            server.stop()
    base = rows[0]
    print(f"\naerie regen through vllm serve ({args.target}, {args.num_conversations} ShareGPT conversations, "
          f"max_tokens={args.max_tokens}); ratios over concurrency {base[0]}:")
    for concurrency, per_min, tok_s, stats in rows:
        rejected = {k[9:]: n for k, n in stats.items() if k.startswith("rejected_")}
        print(f"  concurrency {concurrency:3d}: {per_min:7.1f} conversations/min ({per_min / base[1]:5.2f}x)  "
              f"{tok_s:8.1f} tokens/s ({tok_s / base[2]:5.2f}x)  written {stats['done']}, rejected {rejected}")


if __name__ == "__main__":
    main()
