"""2 gloo ranks under the deepspeed launcher: ZeRO-3 online training, then resume on 1 rank."""
import socket

import pytest

from tests.helpers import TINY_TRAIN_OVERRIDES, read_metrics, run_aerie

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def _port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def test_zero3_two_ranks_then_resume_on_one(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    args = ["train", f"run_dir={run_dir}", f"data.cache_dir={data_cache}", *TINY_TRAIN_OVERRIDES,
            "deepspeed=zero3", "trainer.ckpt_every=6", "trainer.eval_every=12"]
    run_aerie(*args, "trainer.max_steps=12",
              launcher=["--num_gpus", "2", "--no_local_rank", "--master_port", _port()])
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    first, last = sum(m["loss"] for m in metrics[:3]), sum(m["loss"] for m in metrics[-3:])
    assert last < first
    shards = sorted(p.name for p in (run_dir / "ckpt" / "step-12").rglob("*optim_states.pt"))
    assert len(shards) == 2, shards  # each rank wrote its own optimizer partition
    out = run_aerie(*args, "trainer.max_steps=14")
    assert "saved on 2 ranks, now 1" in out.stdout
    resumed = read_metrics(run_dir)
    assert [m["step"] for m in resumed] == list(range(1, 15))
    assert resumed[-1]["loss"] < metrics[0]["loss"]
    assert (run_dir / "final" / "model.safetensors").is_file()
