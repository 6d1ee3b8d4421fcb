"""Smoke tests of the real `aerie` entry point in a subprocess."""
from tests.helpers import run_aerie


def test_help_lists_commands():
    out = run_aerie("--help").stdout
    assert "usage: aerie <command>" in out
    assert "train" in out and "export" in out and "eval" in out


def test_cfg_job_prints_composed_config_and_accepts_local_rank():
    out = run_aerie("train", "--local_rank=1", "trainer.max_steps=7", "--cfg", "job").stdout
    assert "max_steps: 7" in out and "zero_stage: 2" in out and "tiny-chat-llama" in out


def test_misspelt_key_exits_nonzero_naming_it():
    proc = run_aerie("train", "trainer.max_stepz=3", check=False)
    assert proc.returncode != 0
    assert "max_stepz" in proc.stderr + proc.stdout


def test_unknown_command():
    proc = run_aerie("frobnicate", check=False)
    assert proc.returncode == 2 and "unknown command 'frobnicate'" in proc.stderr
