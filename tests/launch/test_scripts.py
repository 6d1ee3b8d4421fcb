"""Fast checks of the launch scripts' argument handling (no training, no Slurm daemons)."""
import os
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_deepspeed_train_sh_splits_launcher_options_from_hydra_overrides(tmp_path):
    # AERIE_PYTHON=echo prints the launcher command line instead of running it
    out = subprocess.run([str(ROOT / "launch/deepspeed/train.sh"), "--num_gpus", "2", "--no_ssh", "--node_rank=1",
                          "--hostfile", "/h", "target=tiny_chat", "+trainer.x=[1,2]", "--not-an-option"],
                         env={**os.environ, "AERIE_PYTHON": "echo"}, cwd=tmp_path, capture_output=True, text=True,
                         check=True).stdout.split()
    assert out == ["-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", "2", "--no_ssh",
                   "--node_rank=1", "--hostfile", "/h", "--module", "trainer.cli", "train", "target=tiny_chat",
                   "+trainer.x=[1,2]", "--not-an-option"]


def resolve_run_dir(tmp_path, *overrides, **env):
    script = (f'SLURM_JOB_NODELIST=localhost SLURM_JOB_ID=7 source {ROOT}/launch/slurm/common.sh; '
              'aerie_resolve_run_dir "$@"; echo "$RUN_DIR"; printf "%s\\n" "${AERIE_OVERRIDES[@]}"')
    proc = subprocess.run(["bash", "-c", script, "bash", *overrides], capture_output=True, text=True, check=True,
                          env={**os.environ, "SLURM_JOB_NAME": "myrun", "AERIE_ROOT": str(tmp_path), **env})
    run_dir, *args = proc.stdout.splitlines()
    return run_dir, args


def test_slurm_run_dir_comes_from_the_job_name_unless_overridden(tmp_path):
    assert resolve_run_dir(tmp_path, "a=1") == (f"{tmp_path}/outputs/myrun", ["a=1", f"run_dir={tmp_path}/outputs/myrun"])
    assert resolve_run_dir(tmp_path, "a=1", AERIE_RUN_ROOT="/r") == ("/r/myrun", ["a=1", "run_dir=/r/myrun"])
    assert resolve_run_dir(tmp_path, "run_dir=/x", "name=n") == ("/x", ["run_dir=/x", "name=n"])
    assert resolve_run_dir(tmp_path, "name=n") == (f"{tmp_path}/outputs/n", ["name=n"])
    assert resolve_run_dir(tmp_path, "b=has space") == (f"{tmp_path}/outputs/myrun",
                                                        ["b=has space", f"run_dir={tmp_path}/outputs/myrun"])
