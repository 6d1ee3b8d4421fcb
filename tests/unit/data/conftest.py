"""Shared fixtures for the data tests: the tiny ChatML fixture tokenizer."""
from pathlib import Path
import pytest

FIXTURE = str(Path(__file__).resolve().parents[2] / "assets" / "tiny-chat-llama")


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURE)
