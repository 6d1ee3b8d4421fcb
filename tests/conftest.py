"""Shared fixtures: the embedded tiny target, a CLI runner, and Hydra/registry state restored after each test."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY_CHAT = REPO / "assets" / "tiny-chat-llama"

# Small enough for 2 CPU cores: a few conversations, short rows, a 3-step TTT unroll.
TINY_TRAIN_OVERRIDES = [
    "data.max_samples=48", "data.max_eval_samples=8", "data.max_length=192",
    "trainer.max_tokens_per_batch=256", "draft.draft_vocab_size=1024", "draft.ttt_steps=3",
    "trainer.warmup_steps=2", "trainer.lr=1e-3", "trainer.eval_every=0", "logger.progress=false",
]


def aerie_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    env.pop("WANDB_API_KEY", None)
    return env


def run_aerie(*args, cwd=None, timeout=900, check=True, launcher=None):
    """Run the real `aerie` console script (optionally under the deepspeed launcher) and return the process."""
    if launcher is None:
        cmd = [str(Path(sys.executable).parent / "aerie"), *args]
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), *launcher, "--module", "trainer.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=aerie_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenised-data cache for the whole session, so each training run re-tokenises nothing."""
    return tmp_path_factory.mktemp("aerie_cache")


@pytest.fixture
def hydra_restore():
    """Clear Hydra's global state after a test that composes configs in-process."""
    from hydra.core.global_hydra import GlobalHydra

    yield
    GlobalHydra.instance().clear()
