"""Resume and checkpoint faults, each reproduced on a copy of a real run: corruption that keeps file sizes, a
torn metrics line, every checkpoint corrupt, a kill between final/'s files, a signal during start-up, a full
disk."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.helpers import BASE_STEPS, REPO, aerie_env, read_metrics, run_aerie, train_args

pytestmark = pytest.mark.slow


def _zero_bytes(path: Path, offset: int = 4096, size: int = 4096) -> None:
    """Overwrite `size` bytes inside a file with zeros, keeping its size (what a bad sector or bit rot
    does)."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(bytes(size))


def _losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


@pytest.fixture(scope="module")
def corrupted_rerun(tmp_path_factory, base_run, data_cache):
    """The base run with final/ gone, 4 KiB zeroed inside the newest model states and the last metrics line
    cut by 40 bytes, then rerun."""
    run_dir = tmp_path_factory.mktemp("corrupt") / "run"
    shutil.copytree(base_run, run_dir)
    shutil.rmtree(run_dir / "final")
    _zero_bytes(run_dir / "ckpt" / "step-4" / "mp_rank_00_model_states.pt")
    metrics = run_dir / "metrics.jsonl"
    os.truncate(metrics, metrics.stat().st_size - 40)
    return run_dir, run_aerie(*train_args(run_dir, data_cache), check=False)


def test_same_size_corruption_is_detected_and_skipped(corrupted_rerun, base_run):
    run_dir, proc = corrupted_rerun
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipping checkpoint" in proc.stderr and "step-4" in proc.stderr and "sha256" in proc.stderr
    assert "resumed from" in proc.stdout and "step-2" in proc.stdout
    shipped, reference = (load_file(str(d / "final" / "model.safetensors")) for d in (run_dir, base_run))
    assert all(shipped[name].equal(reference[name]) for name in reference)  # retrained, not zeroed weights


def test_torn_last_metrics_line_does_not_block_resume(corrupted_rerun, base_run):
    run_dir, proc = corrupted_rerun
    assert proc.returncode == 0 and "JSONDecodeError" not in proc.stderr
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, BASE_STEPS + 1))
    assert _losses(run_dir) == _losses(base_run)


@pytest.mark.timeout(1200)  # two runs; past 600 s only on a machine shared by several suites
def test_every_checkpoint_corrupt_stops_unless_auto_or_fresh(run_copy, data_cache):
    """Also: a fresh start keeps none of the dead run's metrics rows (they move aside with its
    checkpoints)."""
    shutil.rmtree(run_copy / "final")
    (run_copy / "ckpt" / "step-2" / "manifest.json").unlink()
    _zero_bytes(run_copy / "ckpt" / "step-4" / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    proc = run_aerie(*train_args(run_copy, data_cache), check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith("aerie train: error: no usable checkpoint")
    assert "trainer.resume=auto_or_fresh" in proc.stderr and "Traceback" not in proc.stderr
    assert not (run_copy / "final").exists()

    proc = run_aerie(*train_args(run_copy, data_cache, "trainer.resume=auto_or_fresh", "trainer.max_steps=2"))
    assert "training from scratch" in proc.stdout
    assert [m["step"] for m in read_metrics(run_copy)] == [1, 2]  # not 1..4 then 1..2
    aside = next(run_copy.glob("replaced-*"))
    assert sorted(p.name for p in (aside / "ckpt").glob("step-*")) == ["step-2", "step-4"]
    assert ([json.loads(line)["step"] for line in (aside / "metrics.jsonl").read_text().splitlines()]
            == [1, 2, 3, 4])


def test_final_dir_missing_its_config_is_rewritten(run_copy, data_cache):
    """A kill between final/model.safetensors and final/config.yaml used to leave final/ without its
    config."""
    (run_copy / "final" / "config.yaml").unlink()
    before = load_file(str(run_copy / "final" / "model.safetensors"))
    proc = run_aerie(*train_args(run_copy, data_cache))
    assert "already trained" not in proc.stdout
    assert (run_copy / "final" / "config.yaml").is_file() and (run_copy / "final" / "config.json").is_file()
    after = load_file(str(run_copy / "final" / "model.safetensors"))
    assert all(after[name].equal(before[name]) for name in before)
    assert not list(run_copy.glob(".tmp-final-*"))


def test_preemption_signal_during_startup_exits_cleanly(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    cmd = [str(Path(sys.executable).parent / "aerie"), *train_args(run_dir, data_cache)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=aerie_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not (run_dir / "config.yaml").is_file():
        time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)  # the trainer is still building data, target and engine
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    assert "preempted at step 0 (SIGUSR1): no step taken yet" in stdout + stderr
    assert not (run_dir / "metrics.jsonl").exists()


def _disk_full_command(run_dir: Path, limit_bytes: int, args) -> list:
    """`aerie train` with run_dir on a tmpfs of `limit_bytes` (a user+mount namespace), copied back
    afterwards; without namespaces, under RLIMIT_FSIZE (the write fails with EFBIG instead of ENOSPC)."""
    aerie = str(Path(sys.executable).parent / "aerie")
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "true"], capture_output=True)
    if probe.returncode != 0:
        script = (f"import resource, signal, os, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
                  f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit_bytes}, {limit_bytes})); "
                  f"os.execv(sys.argv[1], sys.argv[1:])")
        return [sys.executable, "-c", script, aerie, *args]
    mount = run_dir.parent / "tmpfs"
    mount.mkdir()
    quoted = " ".join(f"'{a}'" for a in args)
    shell = (f"mount -t tmpfs -o size={limit_bytes} tmpfs {mount} && cp -a {run_dir} {mount}/run && "
             f"{aerie} {quoted.replace(str(run_dir), f'{mount}/run')}; rc=$?; rm -rf {run_dir} && "
             f"cp -a {mount}/run {run_dir}; exit $rc")
    return ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", shell]


def test_disk_full_while_checkpointing_says_so_and_keeps_the_previous(run_copy, data_cache):
    shutil.rmtree(run_copy / "final")
    shutil.rmtree(run_copy / "ckpt" / "step-4")
    (run_copy / "ckpt" / "latest").write_text("step-2\n")
    used = sum(p.stat().st_size for p in run_copy.rglob("*") if p.is_file())
    optim = (run_copy / "ckpt" / "step-2" / "zero_pp_rank_0_mp_rank_00_optim_states.pt").stat().st_size
    limit = used + optim // 2 if shutil.which("unshare") else optim // 2
    cmd = _disk_full_command(run_copy, limit, train_args(run_copy, data_cache))
    proc = subprocess.run(cmd, cwd=REPO, env=aerie_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("aerie train: error: ") and "while writing checkpoint step-4 at" in last, last
    assert ("no space left on device" in last or "file too large" in last) and "unexpected pos" not in last
    assert "the previous checkpoint step-2 is intact" in last
    assert (run_copy / "ckpt" / "latest").read_text().strip() == "step-2"
    assert not (run_copy / "ckpt" / ".tmp-step-4").exists() and not (run_copy / "ckpt" / "step-4").exists()
    from trainer.checkpoint import checkpoint_problem
    assert checkpoint_problem(run_copy / "ckpt" / "step-2") is None
