"""End-to-end launch tests: the DeepSpeed launcher (2 local ranks), Slurm (2 tasks, preempted and requeued)
and two network-namespace "nodes", all running the real trainer on the tiny target and agreeing on every
loss."""
import json
import os
import random
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import REPO as ROOT

PYTHON = os.environ.get("AERIE_PYTHON", str(ROOT / ".venv" / "bin" / "python"))
MAX_STEPS = 6
pytestmark = pytest.mark.slow


def overrides(data_file, run_dir):
    return ["target=tiny_chat", f"trainer.max_steps={MAX_STEPS}", "trainer.warmup_steps=0",
            "trainer.eval_every=0", f"trainer.ckpt_every={MAX_STEPS}", "trainer.max_tokens_per_batch=256",
            "draft.ttt_steps=2", "data.source=json", f"data.path={data_file}", "data.heldout_ids_path=",
            "data.max_length=128", "logger.progress=false", f"run_dir={run_dir}"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(run_dir):
    return {m["step"]: m["loss"] for m in read_metrics(run_dir)}


def check_run(run_dir, world_size):
    """Metrics for every step once, a complete last checkpoint behind `latest`, and the final draft."""
    run_dir = Path(run_dir)
    assert [m["step"] for m in read_metrics(run_dir)] == list(range(1, MAX_STEPS + 1))
    step_dir = run_dir / "ckpt" / (run_dir / "ckpt" / "latest").read_text().strip()
    assert step_dir.name == f"step-{MAX_STEPS}"
    manifest = json.loads((step_dir / "manifest.json").read_text())
    for name, entry in manifest["files"].items():
        assert (step_dir / name).stat().st_size == entry["size"], name
    for rank in range(world_size):
        assert f"rng/rank-{rank}.pt" in manifest["files"]
        assert f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" in manifest["files"]
    assert json.loads((step_dir / "trainer_state.json").read_text())["world_size"] == world_size
    assert (run_dir / "final" / "model.safetensors").stat().st_size > 0
    assert json.loads((run_dir / "final" / "config.json").read_text())


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rng = random.Random(0)
    words = "the a cat dog runs jumps over under red blue small big fast slow tree house river".split()
    path = tmp_path_factory.mktemp("data") / "chat.jsonl"
    with open(path, "w") as f:
        for i in range(32):
            q, a = (" ".join(rng.choice(words) for _ in range(rng.randint(4, 12))) for _ in range(2))
            f.write(json.dumps({"id": f"c{i}", "messages": [{"role": "user", "content": q},
                                                           {"role": "assistant", "content": a}]}) + "\n")
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_file):
    """Uninterrupted 2-rank run through launch/deepspeed/train.sh; its losses are what every other path must
    match."""
    run_dir = tmp_path_factory.mktemp("deepspeed") / "run"
    cmd = [str(ROOT / "launch/deepspeed/train.sh"), "--num_gpus", "2", "--master_port", str(free_port()),
           *overrides(data_file, run_dir)]
    proc = subprocess.run(cmd, env={**os.environ, "AERIE_PYTHON": PYTHON}, cwd="/",
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return run_dir


def test_deepspeed_launcher_two_local_ranks(reference):
    check_run(reference, world_size=2)
    values = losses(reference)
    assert values[MAX_STEPS] < values[1]


# ---------------------------------------------------------------------------------------------- Slurm


def sh(*cmd, check=True):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip()


@pytest.fixture(scope="module")
def slurm():
    """The one-host cluster of launch/slurm/local_cluster.sh (started here when it is not up)."""
    script = ROOT / "launch/slurm/local_cluster.sh"
    if shutil.which("sbatch") is None or subprocess.run([script, "status"],
                                                        capture_output=True).returncode != 0:
        proc = subprocess.run([script, "start"], capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            reason = f"no usable Slurm: local_cluster.sh start failed: {proc.stderr.strip()[-500:]}"
            if os.environ.get("AERIE_REQUIRE_SLURM") == "1":
                pytest.fail(reason)
            pytest.skip(reason)


def job_field(job_id, field):
    text = sh("scontrol", "show", "job", "-o", job_id, check=False)
    for item in text.split():
        if item.startswith(field + "="):
            return item.split("=", 1)[1]
    return ""


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


@pytest.mark.timeout(600)
def test_slurm_two_tasks_preempted_requeued_resumes_exactly(slurm, reference, data_file, tmp_path):
    job_name = f"aerie-test-{os.getpid()}"
    logs, run_dir = tmp_path / "logs", tmp_path / "outputs" / job_name
    logs.mkdir()  # Slurm opens --output before the script runs
    env = {**os.environ, "AERIE_PYTHON": PYTHON, "AERIE_LOG_DIR": str(logs),
           "AERIE_RUN_ROOT": str(tmp_path / "outputs"), "MASTER_PORT": str(free_port())}
    # run_dir comes from the job name: drop the explicit one
    args = [a for a in overrides(data_file, run_dir) if not a.startswith("run_dir=")]
    submit = subprocess.run(["sbatch", "--parsable", "-J", job_name, f"--output={logs}/%x-%j.out",
                             "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1",
                             "--time=15", str(ROOT / "launch/slurm/train.sbatch"), *args],
                            env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    try:
        wait_for(lambda: len(read_metrics(run_dir)) >= 1
                 or job_field(job_id, "JobState") not in ("PENDING", "CONFIGURING", "RUNNING"),
                 300, "the first training step")
        assert job_field(job_id, "JobState") == "RUNNING", (logs / f"{job_name}-{job_id}.out").read_text()
        sh("scancel", "--batch", "--signal=USR1", job_id)
        # the job checkpoints and requeues itself; a requeued job waits out Slurm's BeginTime delay, skip it
        wait_for(lambda: job_field(job_id, "Restarts") == "1" and job_field(job_id, "JobState") == "PENDING",
                 180, "the job to requeue")
        # slurmd rejects a credential created in the same second as the revocation of the previous run's
        # ("Job credential revoked"): let a second pass before skipping the delay
        time.sleep(2)
        sh("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        wait_for(lambda: job_field(job_id, "JobState") not in ("PENDING", "RUNNING",
                                                               "REQUEUED", "COMPLETING"),
                 300, "the requeued job to finish")
    finally:
        sh("scancel", job_id, check=False)
    batch_log = (logs / f"{job_name}-{job_id}.out").read_text()
    rank_logs = [(logs / f"{job_name}-{job_id}-rank{r}.out").read_text() for r in range(2)]
    assert job_field(job_id, "JobState") == "COMPLETED", batch_log + rank_logs[0][-3000:]
    assert "SIGUSR1" in batch_log and "requeueing" in batch_log and "restart 1]" in batch_log, batch_log
    assert "preempted at step" in rank_logs[0], rank_logs[0][-3000:]
    preempted_at = int(rank_logs[0].split("preempted at step")[1].split()[0].rstrip(":"))
    assert 1 <= preempted_at < MAX_STEPS
    check_run(run_dir, world_size=2)
    assert losses(run_dir) == losses(reference)


# ---------------------------------------------------------------------------------------------- two "nodes"


@pytest.fixture
def two_namespaces():
    """Network namespaces aerie<pid>a/b joined by a veth pair; 10.200.0.1 and .2 exist only inside them."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    tag = f"aerie{os.getpid() % 100000}"
    names = [f"{tag}a", f"{tag}b"]
    if subprocess.run(["ip", "netns", "add", names[0]], capture_output=True).returncode != 0:
        pytest.skip("cannot create network namespaces (needs root / CAP_SYS_ADMIN)")
    try:
        sh("ip", "netns", "add", names[1])
        sh("ip", "link", "add", f"{tag}x", "type", "veth", "peer", "name", f"{tag}y")
        for ns, dev, addr in ((names[0], f"{tag}x", "10.200.0.1/24"), (names[1], f"{tag}y", "10.200.0.2/24")):
            sh("ip", "link", "set", dev, "netns", ns)
            sh("ip", "-n", ns, "link", "set", dev, "name", "aerie0")  # same name on both: GLOO_SOCKET_IFNAME
            sh("ip", "-n", ns, "addr", "add", addr, "dev", "aerie0")
            sh("ip", "-n", ns, "link", "set", "aerie0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield names
    finally:
        for ns in names:
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


@pytest.mark.timeout(600)
def test_two_nodes_in_network_namespaces(two_namespaces, reference, data_file, tmp_path):
    """One rank per "node" through launch/deepspeed/train.sh's multi-node path (hostfile, --no_ssh,
    --node_rank)."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("10.200.0.1 slots=1\n10.200.0.2 slots=1\n")
    run_dir = tmp_path / "run"
    env = {**os.environ, "AERIE_PYTHON": PYTHON, "GLOO_SOCKET_IFNAME": "aerie0"}
    procs = []
    for node_rank, ns in enumerate(two_namespaces):
        log = open(tmp_path / f"node{node_rank}.log", "w")
        cmd = ["ip", "netns", "exec", ns, str(ROOT / "launch/deepspeed/train.sh"),
               "--hostfile", str(hostfile), "--master_addr", "10.200.0.1", "--master_port", "29500",
               "--no_ssh", "--node_rank", str(node_rank), "--num_gpus", "1", *overrides(data_file, run_dir)]
        procs.append(subprocess.Popen(cmd, env=env, cwd="/", stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    node_logs = [(tmp_path / f"node{r}.log").read_text() for r in range(2)]
    assert codes == [0, 0], "\n".join(log[-3000:] for log in node_logs)
    assert ("--master_addr=10.200.0.1" in node_logs[1]
            and "--node_rank=1" in node_logs[1]), node_logs[1][-3000:]
    assert "'10.200.0.2': [1]" in node_logs[1], node_logs[1][-3000:]  # global rank 1 lives on the second node
    check_run(run_dir, world_size=2)
    values = losses(run_dir)
    assert values[MAX_STEPS] < values[1]
    assert values == losses(reference)
