"""End-to-end `aerie train` on the embedded tiny target (one process): learning, exact resume, failures."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, TINY_TRAIN_OVERRIDES, aerie_env, read_metrics, run_aerie
from trainer.engine import lr_multiplier

pytestmark = pytest.mark.slow


def _args(run_dir, cache, *extra):
    return ["train", f"run_dir={run_dir}", f"data.cache_dir={cache}", *TINY_TRAIN_OVERRIDES, *extra]


def _losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, data_cache):
    """An uninterrupted 8-step run checkpointing every 3 steps; what the other tests compare against."""
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    run_aerie(*_args(run_dir, data_cache, "trainer.max_steps=8", "trainer.ckpt_every=3",
                     "trainer.eval_every=4", "trainer.keep_last=5"))
    return run_dir


def test_trains_logs_and_writes_outputs(reference_run):
    metrics = read_metrics(reference_run)
    assert [m["step"] for m in metrics] == list(range(1, 9))
    first, last = metrics[0], metrics[-1]
    assert last["loss"] < first["loss"]
    for m in metrics:
        assert {"loss_0", "loss_2", "acc_0", "acc_2", "tau_sim", "lr", "num_out_of_vocab"} <= set(m)
        assert 1.0 <= m["tau_sim"] <= 4.0
    assert "eval_tau_sim" in metrics[3] and "eval_loss" in metrics[7]
    assert (reference_run / "config.yaml").is_file() and (reference_run / "vocab.safetensors").is_file()
    steps = sorted(p.name for p in (reference_run / "ckpt").glob("step-*"))
    assert steps == ["step-3", "step-6", "step-8"]
    assert (reference_run / "ckpt" / "latest").read_text().strip() == "step-8"
    assert (reference_run / "final" / "model.safetensors").is_file()
    assert (reference_run / "final" / "config.yaml").is_file()


def test_lr_follows_schedule(reference_run):
    """The LR logged at each step is the warm-up + cosine formula applied to trainer.lr."""
    for m in read_metrics(reference_run):
        expected = 1e-3 * lr_multiplier(m["step"] - 1, 2, 8, "cosine", 0.1)
        assert m["lr"] == pytest.approx(expected, rel=1e-6), m["step"]


def test_exact_resume_after_kill_9(reference_run, tmp_path, data_cache):
    """kill -9 after step 4 (checkpoint at 3), resume: steps 4..8 match the uninterrupted run bit for bit."""
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "aerie"),
           *_args(run_dir, data_cache, "trainer.max_steps=8", "trainer.ckpt_every=3", "trainer.eval_every=4",
                  "trainer.keep_last=5")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=aerie_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").is_file() and any(m["step"] >= 5 for m in read_metrics(run_dir)):
            break
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (run_dir / "ckpt" / "step-3").is_dir() and not (run_dir / "final").exists()
    out = run_aerie(*_args(run_dir, data_cache, "trainer.max_steps=8", "trainer.ckpt_every=3",
                           "trainer.eval_every=4", "trainer.keep_last=5"))
    assert "resumed from" in out.stdout
    resumed, reference = read_metrics(run_dir), read_metrics(reference_run)
    # records after step 6's checkpoint were replaced
    assert [m["step"] for m in resumed] == list(range(1, 9))
    for a, b in zip(resumed, reference):
        assert a["loss"] == b["loss"] and a["acc_0"] == b["acc_0"], a["step"]


def test_corrupt_newest_checkpoint_is_skipped(reference_run, tmp_path, data_cache):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference_run, run_dir)
    shutil.rmtree(run_dir / "final")
    newest = run_dir / "ckpt" / "step-8"
    victim = next(p for p in sorted(newest.rglob("*.pt")) if "rng" not in p.parts)
    victim.write_bytes(victim.read_bytes()[:100])  # truncated shard
    out = run_aerie(*_args(run_dir, data_cache, "trainer.max_steps=8", "trainer.ckpt_every=3",
                           "trainer.eval_every=4", "trainer.keep_last=5"))
    assert "skipping checkpoint" in out.stderr and "step-8" in out.stderr
    assert "resumed from" in out.stdout and "step-6" in out.stdout
    reference = _losses(reference_run)
    assert all(_losses(run_dir)[s] == reference[s] for s in (7, 8))


def test_nonfinite_loss_is_skipped_then_stops(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    run_aerie(*_args(run_dir, data_cache, "trainer.max_steps=3", "trainer.fail_on_nonfinite_at=[2]"))
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3] and metrics[-1]["num_bad_steps"] == 1
    run_dir = tmp_path / "run2"
    proc = run_aerie(*_args(run_dir, data_cache, "trainer.max_steps=5", "trainer.max_bad_steps=1",
                            "trainer.fail_on_nonfinite_at=[2,3]"), check=False)
    assert proc.returncode != 0
    assert "2 non-finite losses in a row" in proc.stderr
    assert (run_dir / "ckpt" / "step-1").is_dir()


def test_sigterm_checkpoints_and_exits_cleanly(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "aerie"), *_args(run_dir, data_cache, "trainer.max_steps=50")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=aerie_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while time.time() < deadline and not (run_dir / "metrics.jsonl").is_file():
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "preempted at step" in stdout + stderr
    latest = (run_dir / "ckpt" / "latest").read_text().strip()
    assert latest == f"step-{read_metrics(run_dir)[-1]['step']}"
