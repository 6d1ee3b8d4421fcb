"""Shared fixtures for the data tests: the tiny ChatML fixture tokenizer."""
import pytest

from tests.helpers import TINY_CHAT


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY_CHAT))
