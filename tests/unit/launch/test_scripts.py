"""Fast checks of the launch scripts' argument handling (no training, no Slurm daemons)."""
import os
import subprocess

from tests.helpers import REPO as ROOT


def test_deepspeed_train_sh_splits_launcher_options_from_hydra_overrides(tmp_path):
    # AERIE_PYTHON=echo prints the launcher command line instead of running it
    out = subprocess.run([str(ROOT / "launch/deepspeed/train.sh"), "--num_gpus", "2", "--no_ssh",
                          "--node_rank=1", "--hostfile", "/h", "target=tiny_chat", "+trainer.x=[1,2]",
                          "--not-an-option"],
                         env={**os.environ, "AERIE_PYTHON": "echo"}, cwd=tmp_path,
                         capture_output=True, text=True, check=True).stdout.split()
    assert out == ["-m", "deepspeed.launcher.runner", "--no_local_rank", "--num_gpus", "2", "--no_ssh",
                   "--node_rank=1", "--hostfile", "/h", "--module", "tools.cli", "train", "target=tiny_chat",
                   "+trainer.x=[1,2]", "--not-an-option"]


def resolve_run_dir(tmp_path, *overrides, **env):
    script = (f'SLURM_JOB_NODELIST=localhost SLURM_JOB_ID=7 source {ROOT}/launch/slurm/common.sh; '
              'aerie_resolve_run_dir "$@"; echo "$RUN_DIR"; printf "%s\\n" "${AERIE_OVERRIDES[@]}"')
    proc = subprocess.run(["bash", "-c", script, "bash", *overrides],
                          capture_output=True, text=True, check=True,
                          env={**os.environ, "SLURM_JOB_NAME": "myrun", "AERIE_ROOT": str(tmp_path), **env})
    run_dir, *args = proc.stdout.splitlines()
    return run_dir, args


def test_slurm_run_dir_comes_from_the_job_name_unless_overridden(tmp_path):
    assert resolve_run_dir(tmp_path, "a=1") == (f"{tmp_path}/outputs/myrun",
                                                ["a=1", f"run_dir={tmp_path}/outputs/myrun"])
    assert resolve_run_dir(tmp_path, "a=1", AERIE_RUN_ROOT="/r") == ("/r/myrun", ["a=1", "run_dir=/r/myrun"])
    assert resolve_run_dir(tmp_path, "run_dir=/x", "name=n") == ("/x", ["run_dir=/x", "name=n"])
    assert resolve_run_dir(tmp_path, "name=n") == (f"{tmp_path}/outputs/n", ["name=n"])
    assert resolve_run_dir(tmp_path, "b=has space") == (f"{tmp_path}/outputs/myrun",
                                                        ["b=has space", f"run_dir={tmp_path}/outputs/myrun"])


def test_vllm_serve_sh_passes_flags_adds_cpu_settings_and_fails_when_the_server_dies(tmp_path):
    # AERIE_VLLM_PYTHON=echo prints the server command line (to stderr, the server's log) and exits at once;
    # PATH holds only what the script needs besides bash, so no nvidia-smi: the CPU build's settings
    tools = tmp_path / "bin"
    tools.mkdir()
    for tool in ("bash", "dirname", "sleep"):
        (tools / tool).symlink_to(
            subprocess.run(["which", tool], capture_output=True, text=True).stdout.strip())
    proc = subprocess.run([str(ROOT / "launch/vllm/serve.sh"), "/models/t", "--port=8123",
                           "--tensor-parallel-size", "2"],
                          env={**os.environ, "AERIE_VLLM_PYTHON": "echo", "PATH": str(tools)}, cwd=tmp_path,
                          capture_output=True, text=True)
    assert proc.returncode == 1 and proc.stdout == ""  # no URL: it never became healthy
    command, message = proc.stderr.strip().splitlines()[-2:]
    assert command.split() == ["-m", "vllm.entrypoints.launchers.api_server.entry", "--model",
                               "/models/t", "--host", "127.0.0.1", "--port", "8123", "--tensor-parallel-size",
                               "2", "--dtype", "float32", "--enforce-eager"]
    assert message == "serve.sh: vLLM's server for /models/t (echo) exited (0) before /health answered"
