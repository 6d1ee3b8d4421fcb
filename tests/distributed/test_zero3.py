"""2 gloo ranks under ZeRO-3: each holds half the target, and the forward equals the unsharded one."""
import json
import os
import subprocess
import sys

import pytest

from tests.helpers import REPO, save_tiny

ROOT = str(REPO)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_partitioned_forward_matches_unsharded(tmp_path):
    path = save_tiny(tmp_path / "llama", "llama")
    result_path = tmp_path / "result.json"
    launcher = os.path.join(os.path.dirname(sys.executable), "deepspeed")
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    proc = subprocess.run([launcher, "--num_gpus", "2", "--no_local_rank", "--master_port", "29517",
                           os.path.join(ROOT, "tests/distributed/zero3_worker.py"), path, str(result_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(result_path.read_text())
    assert [r["rank"] for r in results] == [0, 1]
    for r in results:
        assert abs(r["local"] - r["total"] / 2) <= 0.02 * r["total"], r
        assert r["aux_max_diff"] < 1e-5 and r["logits_max_diff"] < 1e-4, r
        assert r["argmax_equal"] and r["embed_equal"] and r["grad_free"], r
