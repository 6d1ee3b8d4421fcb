"""Token-budget sampler (grouped and packed), rank sharding, exact resume, and collate layouts."""
import random

import pytest
import torch

from data.batching import TokenBudgetBatchSampler, collate

_RNG = random.Random(0)
LENGTHS = [_RNG.randint(1, 60) for _ in range(300)]


@pytest.mark.parametrize("packed", [False, True])
def test_budget_and_coverage(packed):
    sampler = TokenBudgetBatchSampler(LENGTHS, 128, packed=packed, seed=3, mega_bucket_size=64)
    batches = list(sampler)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    for b in batches:
        cost = sum(LENGTHS[i] for i in b) if packed else max(LENGTHS[i] for i in b) * len(b)
        assert cost <= 128
    if packed:  # first-fit-decreasing fills rows well
        assert sum(LENGTHS) / (128 * len(batches)) > 0.9
    assert list(sampler) == batches  # same epoch, same order
    sampler.set_epoch(1)
    assert list(sampler) != batches


def test_oversized_sample_gets_own_batch():
    batches = list(TokenBudgetBatchSampler([10, 500, 10], 64, packed=True, shuffle=False))
    assert [1] in batches and sorted(i for b in batches for i in b) == [0, 1, 2]


def test_ranks_equal_and_disjoint():
    per_rank = [list(TokenBudgetBatchSampler(LENGTHS, 100, seed=1, rank=r, world_size=3)) for r in range(3)]
    assert len({len(b) for b in per_rank}) == 1
    seen = [i for batches in per_rank for b in batches for i in b]
    assert set(seen) == set(range(len(LENGTHS)))
    # wrap padding only
    assert len(seen) - len(LENGTHS) < 3 * max(len(b) for batches in per_rank for b in batches)


@pytest.mark.parametrize("packed", [False, True])
def test_identity_names_what_the_batches_depend_on(packed):
    sampler = TokenBudgetBatchSampler(LENGTHS, 128, packed=packed, seed=5, rank=1, world_size=2)
    sampler.set_epoch(2)
    same = TokenBudgetBatchSampler(LENGTHS, 128, packed=packed, seed=5, rank=0, world_size=2)
    assert same.identity() == sampler.identity()  # neither the rank nor the epoch changes the batches
    for other in (TokenBudgetBatchSampler(LENGTHS, 256, packed=packed, seed=5, rank=1, world_size=2),
                  TokenBudgetBatchSampler(LENGTHS, 128, packed=packed, seed=6, rank=1, world_size=2),
                  TokenBudgetBatchSampler(LENGTHS[:-1], 128, packed=packed, seed=5, rank=1, world_size=2)):
        assert other.identity() != sampler.identity()


def test_collate_padded_and_packed():
    samples = [{"input_ids": [5, 6, 7], "loss_mask": [0, 1, 1]}, {"input_ids": torch.tensor([8, 9]),
                                                                  "loss_mask": torch.tensor([1, 0])}]
    padded = collate(samples, packed=False, max_tokens=16, pad_token_id=0)
    assert padded["input_ids"].tolist() == [[5, 6, 7], [8, 9, 0]]
    assert padded["loss_mask"].tolist() == [[0, 1, 1], [1, 0, 0]]
    assert padded["position_ids"].tolist() == [[0, 1, 2], [0, 1, 0]]
    assert padded["document_ids"].tolist() == [[0, 0, 0], [0, 0, -1]]
    packed = collate(samples, packed=True, max_tokens=4, pad_to_multiple_of=8)
    assert packed["input_ids"].tolist() == [[5, 6, 7, 8, 0, 0, 0, 0]]
    assert packed["position_ids"].tolist() == [[0, 1, 2, 0, 0, 0, 0, 0]]
    assert packed["document_ids"].tolist() == [[0, 0, 0, 1, -1, -1, -1, -1]]
    assert packed["loss_mask"].tolist() == [[0, 1, 1, 1, 0, 0, 0, 0]]
    assert all(t.dtype == torch.long for t in packed.values())
