"""Process-group setup (trainer/distributed.py): rank and world size from the launcher's or Slurm's variables,
the collectives without a group (a lone process) and with a real one-process group."""
import os

import pytest
import torch
import torch.distributed as dist

from trainer.distributed import (
    DistInfo,
    _first_slurm_host,
    all_reduce_sum,
    barrier,
    broadcast_object,
    dist_info,
    export_slurm_env,
)

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
       "SLURM_LOCALID", "SLURM_JOB_NODELIST", "SLURM_JOB_ID")


@pytest.fixture
def clean_env(monkeypatch):
    for key in ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


@pytest.mark.parametrize("nodelist,first", [("node[01-04,07]", "node01"), ("gpu[3,5]", "gpu3"), ("a,b", "a"),
                                            ("single", "single")])
def test_first_slurm_host(nodelist, first):
    assert _first_slurm_host(nodelist) == first


def test_a_lone_process_is_rank_0_of_1(clean_env):
    info = dist_info()
    assert info == DistInfo(rank=0, world_size=1, local_rank=0) and info.is_main


def test_launcher_variables_are_read(clean_env):
    clean_env.setenv("RANK", "3")
    clean_env.setenv("WORLD_SIZE", "4")
    clean_env.setenv("LOCAL_RANK", "1")
    info = dist_info()
    assert info == DistInfo(rank=3, world_size=4, local_rank=1) and not info.is_main


def test_slurm_variables_become_torch_ones(clean_env):
    for key, value in {"SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_LOCALID": "1",
                       "SLURM_JOB_NODELIST": "node[07-08]", "SLURM_JOB_ID": "12345"}.items():
        clean_env.setenv(key, value)
    assert dist_info() == DistInfo(rank=5, world_size=8, local_rank=1)
    assert os.environ["MASTER_ADDR"] == "node07" and os.environ["MASTER_PORT"] == str(29500 + 345)
    clean_env.setenv("SLURM_PROCID", "6")  # RANK is set now: the launcher's variables win
    export_slurm_env()
    assert os.environ["RANK"] == "5"


def test_collectives_without_a_group_are_identities():
    assert not dist.is_initialized()
    barrier()
    t = torch.tensor([1.0, 2.0])
    assert all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    assert broadcast_object({"step": 4}) == {"step": 4}


@pytest.mark.slow  # DeepSpeed's start-up (its CPU comm op) takes more than 10 s
def test_init_distributed_starts_a_one_process_group(process_group):
    assert process_group == DistInfo(rank=0, world_size=1, local_rank=0)
    assert dist.is_initialized() and dist.get_world_size() == 1 and dist.get_backend() == "gloo"
    assert os.environ["RANK"] == "0" and os.environ["MASTER_ADDR"] == "127.0.0.1"
    assert all_reduce_sum(torch.tensor([3.0])).item() == 3.0
    assert broadcast_object(["found", 2]) == ["found", 2]
    barrier()
