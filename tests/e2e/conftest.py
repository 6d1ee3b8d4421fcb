"""Shared runs of the end-to-end tier: one tiny finished run that the fault tests copy and damage."""
import shutil

import pytest

from tests.helpers import TINY_CHAT, run_aerie, train_args


@pytest.fixture(scope="session")
def base_run(tmp_path_factory, data_cache):
    """An uninterrupted 4-step run with checkpoints at steps 2 and 4 and final/ (never modified by a test)."""
    run_dir = tmp_path_factory.mktemp("reliability") / "base"
    run_aerie(*train_args(run_dir, data_cache))
    return run_dir


@pytest.fixture
def run_copy(base_run, tmp_path):
    """A private copy of the base run to damage."""
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_CHAT))
