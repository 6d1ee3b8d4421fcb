"""Shared fixtures for the data tests: the tiny ChatML fixture tokenizer."""
import pytest

FIXTURE = "/work/shared/fixtures/tiny-chat-llama"


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(FIXTURE)
