"""A one-process DeepSpeed group (gloo on CPU) for the trainer tests that need a real engine; torn down after
each module (so that the other tests see a lone process)."""
import os

import pytest

from tests.helpers import end_process_group

DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(scope="module")
def process_group():
    from trainer.distributed import init_distributed

    saved = {key: os.environ.get(key) for key in DIST_ENV}
    for key in DIST_ENV:
        os.environ.pop(key, None)
    info = init_distributed()
    yield info
    end_process_group()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
