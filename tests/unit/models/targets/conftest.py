"""Tiny random causal LMs (tests.helpers.save_tiny) saved to disk (Llama, Qwen2, Qwen2-MoE) for the target
tests."""
import pytest

from tests.helpers import save_tiny


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_targets")
    return {name: save_tiny(root / name, name) for name in ("llama", "qwen2", "qwen2_moe")}
