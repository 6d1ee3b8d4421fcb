"""Training throughput on the embedded tiny target: online vs offline, 1 vs 2 ranks, and where a step goes.

    .venv/bin/python bench/train.py [--steps 8] [--tokens 1024]

Each configuration runs in its own process group under the deepspeed launcher (gloo on CPU) and reports
tokens/s, peak RSS per rank and the share of step time in data, target forward, head forward+backward
and the optimizer.  Ratios are printed against the 1-rank online run of the same invocation.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def overrides(args, run_dir: str, mode: str) -> list:
    return [f"run_dir={run_dir}", f"data.cache_dir={args.cache}", "data.max_samples=200",
            "data.max_length=512", f"trainer.max_tokens_per_batch={args.tokens}",
            "draft.draft_vocab_size=2048", "draft.ttt_steps=7",
            f"trainer.mode={mode}", "trainer.eval_every=0", "trainer.ckpt_every=0", "logger.progress=false",
            "trainer.resume=never", f"trainer.max_steps={args.steps + 2}", "store.layout=compact"]


def worker(args) -> None:
    import torch
    from hydra import compose, initialize_config_dir

    from models.objectives.base import TeacherInputs
    from tools.config import register_configs
    from trainer.train import Trainer

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="train", overrides=overrides(args, args.run_dir, args.mode))
    trainer = Trainer(cfg)
    module, engine = trainer.module, trainer.engine
    phases = {"data": 0.0, "target_forward": 0.0, "head_forward_backward": 0.0, "optimizer": 0.0}
    tokens = 0
    for step in range(args.steps + 2):
        timed = step >= 2  # two warm-up steps
        t0 = time.perf_counter()
        batch = next(trainer.data.train_batches)
        t1 = time.perf_counter()
        aux, logits, argmax, embeds, positions = module.teacher(batch)
        t2 = time.perf_counter()
        inputs = TeacherInputs(batch["input_ids"], aux, logits, argmax, batch["loss_mask"], positions,
                               batch["document_ids"], embeds)
        out = module.objective(module.draft, inputs)
        engine.backward(out.loss)
        t3 = time.perf_counter()
        engine.step()
        t4 = time.perf_counter()
        if timed:
            tokens += int((batch["document_ids"] >= 0).sum())
            for key, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[key] += dt
    total = sum(phases.values())
    stats = torch.tensor([tokens, total, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0])
    import torch.distributed as dist

    gathered = [torch.zeros_like(stats) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, stats)
    if trainer.dist.is_main:
        print("BENCH " + json.dumps({
            "tokens_per_s": sum(float(g[0]) for g in gathered) / max(float(g[1]) for g in gathered),
            "peak_rss_mib_per_rank": [round(float(g[2])) for g in gathered],
            "share": {k: v / total for k, v in phases.items()}}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def launch(args, mode: str, world: int, run_dir: str) -> dict:
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(world), "--no_local_rank",
           "--master_port", _port(), str(Path(__file__).resolve()), "--worker", "--mode", mode,
           "--run-dir", run_dir, "--steps", str(args.steps), "--tokens", str(args.tokens),
           "--cache", args.cache]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, 2 // world))}
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = [line for line in out.stdout.splitlines() if line.startswith("BENCH ")]
    if out.returncode != 0 or not lines:
        raise SystemExit(f"{mode} x{world} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("BENCH "):])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--mode", default="online")
    parser.add_argument("--run-dir", default="")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "aerie-bench-cache"))
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    root = Path(tempfile.mkdtemp(prefix="aerie-bench-train-"))
    store_run = str(root / "offline")
    subprocess.run([str(Path(sys.executable).parent / "aerie"), "dump",
                    *overrides(args, store_run, "online")], cwd=REPO, check=True, capture_output=True)
    results = {}
    for mode in ("online", "offline"):
        for world in (1, 2):
            run_dir = store_run if mode == "offline" else str(root / f"online-{world}")
            results[(mode, world)] = launch(args, mode, world, run_dir)
    base = results[("online", 1)]["tokens_per_s"]
    print(f"TTT k=7, tiny trained target (8 layers, H=256), {args.tokens} tokens/micro-batch, "
          f"{args.steps} timed steps, CPU gloo")
    print(f"{'mode':8} {'ranks':>5} {'tok/s':>9} {'vs online x1':>12} {'peak RSS MiB/rank':>18}   "
          f"data / target fwd / head fwd+bwd / optimizer")
    for (mode, world), r in results.items():
        share = " / ".join(f"{100 * r['share'][k]:.0f}%" for k in
                           ("data", "target_forward", "head_forward_backward", "optimizer"))
        print(f"{mode:8} {world:>5} {r['tokens_per_s']:>9.0f} {r['tokens_per_s'] / base:>12.2f} "
              f"{str(r['peak_rss_mib_per_rank']):>18}   {share}")


if __name__ == "__main__":
    main()
