"""Data pipeline benchmark: tokenisation throughput, hidden-state store bytes/token, store reader throughput.

Each figure is printed with a ratio against a baseline measured in the same process:
- loss-mask templating (data.template, auto method) vs plain apply_chat_template(tokenize=True);
- datasets.map with num_proc=2 vs num_proc=1;
- bytes/token of each store layout vs the 8*H bf16 baseline (computed, and measured on written shards);
- reader tokens/s (dequantised on CPU, or raw fp8 for on-device dequantisation) vs a training step's
  consumption rate (--train-tokens-per-s);
- with --dump-engines N (only this): `aerie dump` tokens/s of the vLLM path (vLLM's hidden-state extraction +
  Aerie's norm/lm_head teacher, compact store) vs the HF forward path, on N ShareGPT conversations of the tiny
  target.

    .venv/bin/python bench/data.py [--num-samples 300] [--train-tokens-per-s 50000] [--dump-engines 64]
"""
from __future__ import annotations

import argparse
import fcntl
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

FIXTURE_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                             "tiny-chat-llama")

from data.dataset import tokenize_records  # noqa: E402
from data.sources import DataConfig, load_conversations  # noqa: E402
from data.store.format import bytes_per_token  # noqa: E402
from data.store.reader import HiddenStateStoreReader  # noqa: E402
from data.store.writer import HiddenStateStoreWriter  # noqa: E402
from data.template import tokenize_conversation  # noqa: E402


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def bench_tokenisation(tokenizer, records, max_length):
    def plain():
        return [tokenizer.apply_chat_template(r["messages"], tokenize=True)["input_ids"][:max_length]
                for r in records]

    def masked():
        return [tokenize_conversation(tokenizer, r["messages"], max_length)["input_ids"] for r in records]

    base, t_base = timed(plain)
    ours, t_ours = timed(masked)
    tokens = sum(map(len, ours))
    print(f"tokenise {len(records)} conversations (max_length={max_length}, {tokens} tokens):")
    print(f"  plain apply_chat_template : {len(records) / t_base:8.1f} samples/s "
          f"{sum(map(len, base)) / t_base:10.0f} tok/s")
    print(f"  template + loss mask      : {len(records) / t_ours:8.1f} samples/s "
          f"{tokens / t_ours:10.0f} tok/s   ratio vs plain {t_base / t_ours:.2f}x")
    times = {}
    for num_proc in (1, 2):
        cfg = DataConfig(max_length=max_length, num_proc=num_proc)
        _, times[num_proc] = timed(lambda: tokenize_records(records, tokenizer, cfg))
    print(f"  datasets.map num_proc=1   : {len(records) / times[1]:8.1f} samples/s")
    print(f"  datasets.map num_proc=2   : {len(records) / times[2]:8.1f} samples/s"
          f"   ratio vs num_proc=1 {times[1] / times[2]:.2f}x")


def write_store(path, layout, hidden_size, vocab_size, num_samples, length, topk=8, tail_samples=36):
    g = torch.Generator().manual_seed(0)
    writer = HiddenStateStoreWriter(path, layout, hidden_size, 3, [2, 4, 5], vocab_size, "bench", topk=topk,
                                    shard_bytes=32 << 20, tail_samples=tail_samples)
    for i in range(num_samples):
        sample = {"input_ids": torch.randint(0, vocab_size, (length,), generator=g),
                  "loss_mask": torch.ones(length, dtype=torch.long),
                  "aux_hidden_states": torch.randn(length, 3 * hidden_size, generator=g)}
        if layout == "full":
            sample["last_hidden_state"] = torch.randn(length, hidden_size, generator=g)
        else:
            sample.update(teacher_topk_logprobs=-torch.rand(length, topk, generator=g),
                          teacher_topk_ids=torch.randint(0, vocab_size, (length, topk), generator=g),
                          teacher_tail_ids=torch.randint(0, vocab_size, (length, tail_samples), generator=g),
                          teacher_argmax=torch.randint(0, vocab_size, (length,), generator=g))
        writer.add(**sample)
    writer.close()
    return writer


def bench_store(train_tokens_per_s, num_samples=64, length=512):
    print("store bytes/token (3 aux layers, top-k 8, 36 tail samples) vs the 8*H bf16 baseline:")
    for hidden_size, vocab_size in ((4096, 128256), (256, 8192)):
        for layout in ("full", "compact"):
            size = bytes_per_token(layout, hidden_size, 3, vocab_size, include_tokens=False)
            print(f"  H={hidden_size:5d} V={vocab_size:6d} {layout:8s}: {size:6d} B/token = "
                  f"{size / hidden_size:.2f}*H   ratio vs 8*H {size / (8 * hidden_size):.3f}")
    with tempfile.TemporaryDirectory() as tmp:
        for layout in ("full", "compact"):
            path = os.path.join(tmp, layout)
            writer = write_store(path, layout, 256, 8192, num_samples, length)
            on_disk = sum(s["bytes"] for s in writer.manifest["shards"])
            num_tokens = num_samples * length
            print(f"  measured H=256 {layout:8s}: {on_disk / num_tokens:7.1f} B/token on disk "
                  f"(incl. ids, mask, headers)   ratio vs 8*H {on_disk / num_tokens / (8 * 256):.3f}")
            modes = [("bf16", True)] + ([("raw fp8", False)] if layout == "compact" else [])
            for mode, dequantize in modes:
                reader = HiddenStateStoreReader(path, dtype=torch.bfloat16, dequantize=dequantize)
                _, seconds = timed(lambda: sum(s["aux_hidden_states"].shape[0] for s in reader))
                rate = num_tokens / seconds
                print(f"  reader {layout:8s} H=256 -> {mode:7s}: {rate:10.0f} tok/s   ratio vs training "
                      f"{train_tokens_per_s:.0f} tok/s {rate / train_tokens_per_s:.2f}x")


def bench_dump_engines(tokenizer, records, max_length):
    """HF forward dump vs vLLM extraction dump of the same tokenised samples, tokens/s (vLLM start-up
    apart)."""
    from safetensors.torch import load_file

    from data.store.format import StoreConfig
    from models.targets.base import TargetConfig
    from models.targets.hf import HFTargetModel
    from models.targets.teacher import load_lm_head_only
    from tools.dump import dump_from_hidden_states, run_dump
    from tools.vllm.engine import EngineConfig, run_vllm

    rows = [{"id": r["id"], **tokenize_conversation(tokenizer, r["messages"], max_length)} for r in records]
    num_tokens = sum(len(r["input_ids"]) for r in rows)
    target_cfg = TargetConfig(path=FIXTURE_MODEL, dtype="float32")
    with tempfile.TemporaryDirectory() as tmp:
        target = HFTargetModel.load(target_cfg)
        hf_store = StoreConfig(path=os.path.join(tmp, "hf"))
        _, t_hf = timed(lambda model=target: run_dump(model, rows, hf_store))  # bound: `del target` follows
        spec, teacher = target.spec, load_lm_head_only(target_cfg)
        del target
        job = {"target": FIXTURE_MODEL, "layer_ids": list(spec.aux_layer_ids) + [spec.num_layers],
               "prompt_token_ids": [list(r["input_ids"]) for r in rows],
               "out_dir": os.path.join(tmp, "states")}
        worker = Path(__file__).resolve().parents[1] / "tools" / "vllm" / "dump_worker.py"
        with open("/tmp/aerie-vllm.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one vLLM at a time on a shared machine
            result, t_total = timed(lambda: run_vllm(job, EngineConfig(max_model_len=max(2048, max_length)),
                                                     worker))
        samples = ((i, row, load_file(path)["hidden_states"])
                   for i, (row, path) in enumerate(zip(rows, result["files"])))
        store = StoreConfig(path=os.path.join(tmp, "vllm"))
        _, t_store = timed(lambda: dump_from_hidden_states(spec, teacher, samples, store))
    t_vllm = result["seconds"] + t_store
    print(f"dump {len(rows)} conversations ({num_tokens} tokens, compact store, tiny target, fp32 CPU):")
    print(f"  HF forward            : {num_tokens / t_hf:10.0f} tok/s")
    print(f"  vLLM extraction       : {num_tokens / t_vllm:10.0f} tok/s   ratio vs HF {t_hf / t_vllm:.2f}x "
          f"(vLLM {result['seconds']:.1f} s + store {t_store:.1f} s; vLLM start-up apart: "
          f"{t_total - result['seconds']:.0f} s)")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, default=300)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--train-tokens-per-s", type=float, default=50000.0,
                        help="tokens a training step consumes per second (the reader must stay ahead of it)")
    parser.add_argument("--dump-engines", type=int, default=0, metavar="N",
                        help="only time `aerie dump` through vLLM vs HF on N conversations "
                             "(needs .venv-vllm)")
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURE_MODEL)
    records, _ = load_conversations(DataConfig())
    if args.dump_engines:
        bench_dump_engines(tokenizer, records[: args.dump_engines], 512)
        return
    bench_tokenisation(tokenizer, records[: args.num_samples], args.max_length)
    bench_store(args.train_tokens_per_s)


if __name__ == "__main__":
    main()
