"""Tiny draft fixtures: a TargetSpec stand-in, a float64 draft and batches (padded or packed)."""
import pytest

from tests.helpers import make_batch, make_draft, make_spec


@pytest.fixture
def draft_factory():
    return make_draft


@pytest.fixture
def batch_factory():
    return make_batch


@pytest.fixture
def spec_factory():
    return make_spec
