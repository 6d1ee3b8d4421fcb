"""Stand-in for `python -m trainer.cli train` with the trainer's run-directory contract, for the launch tests.

Takes `key=value` overrides (run_dir, trainer.max_steps, trainer.ckpt_every; others ignored), joins
torch.distributed (gloo) from the env the launchers set, trains a linear regression with a deterministic
per-step loss, appends {"step", "loss"} to <run_dir>/metrics.jsonl, checkpoints to <run_dir>/ckpt/step-N/
with a <run_dir>/ckpt/latest pointer, resumes from it, writes <run_dir>/final/, and on SIGTERM/SIGUSR1
checkpoints, prints "preempted at step N" and exits 0.
"""
import json
import os
import signal
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.getcwd())
from trainer.distributed import dist_info  # noqa: E402  (the real Slurm -> torch env mapping)


def atomic_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def atomic_text(path, text):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv):
    args = argv[1:] if argv[:1] == ["train"] else argv
    overrides = dict(a.split("=", 1) for a in args if "=" in a)
    run_dir = overrides.get("run_dir", "outputs/default")
    max_steps = int(overrides.get("trainer.max_steps", 20))
    ckpt_every = int(overrides.get("trainer.ckpt_every", 0))
    step_seconds = float(os.environ.get("STANDIN_STEP_SECONDS", "0.2"))

    requested = []
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, lambda signum, frame: requested.append(signum))

    info = dist_info()
    if info.world_size > 1:
        dist.init_process_group("gloo")
    ckpt_dir = os.path.join(run_dir, "ckpt")
    os.makedirs(ckpt_dir, exist_ok=True)

    weight = torch.zeros(8)
    step = 0
    latest = os.path.join(ckpt_dir, "latest")
    if os.path.exists(latest):
        with open(latest) as f:
            state = torch.load(os.path.join(ckpt_dir, f.read().strip(), "state.pt"))
        weight, step = state["weight"], state["step"]
        print(f"resumed from step {step}", flush=True)

    def checkpoint():
        if info.rank == 0:
            step_dir = os.path.join(ckpt_dir, f"step-{step}")
            os.makedirs(step_dir, exist_ok=True)
            atomic_save({"weight": weight, "step": step}, os.path.join(step_dir, "state.pt"))
            atomic_text(latest, f"step-{step}")
        if info.world_size > 1:
            dist.barrier()

    true_weight = torch.arange(8, dtype=torch.float32) / 8
    while step < max_steps:
        gen = torch.Generator().manual_seed(1000 * step + info.rank)
        x = torch.randn(16, 8, generator=gen)
        y = x @ true_weight
        err = x @ weight - y
        loss = (err ** 2).mean()
        grad = 2 * x.T @ err / len(x)
        stats = torch.cat([loss.view(1), grad, torch.tensor([float(bool(requested))])])
        if info.world_size > 1:
            dist.all_reduce(stats)
        loss, grad = stats[0] / info.world_size, stats[1:9] / info.world_size
        weight = weight - 0.1 * grad
        step += 1
        if info.rank == 0:
            with open(os.path.join(run_dir, "metrics.jsonl"), "a") as f:
                f.write(json.dumps({"step": step, "loss": round(loss.item(), 6)}) + "\n")
        if stats[9] > 0:
            checkpoint()
            print(f"preempted at step {step}", flush=True)
            return 0
        if ckpt_every and step % ckpt_every == 0:
            checkpoint()
        time.sleep(step_seconds)
    checkpoint()
    if info.rank == 0:
        os.makedirs(os.path.join(run_dir, "final"), exist_ok=True)
        atomic_save({"weight": weight}, os.path.join(run_dir, "final", "model.pt"))
    print(f"finished at step {step}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
