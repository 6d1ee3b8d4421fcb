"""Draft vocabulary from token frequencies: selection, tie order, d2t / t2d consistency
(target id = i + d2t[i])."""
import pytest
import torch

from data.vocab import build_draft_vocab


def test_most_frequent_ids_ties_to_lower_id_sorted_ascending():
    counts = torch.tensor([5, 0, 9, 5, 1, 9, 5, 0])
    d2t, t2d = build_draft_vocab(counts, 4)
    # 9, 9 (ids 2, 5), then the count-5 ties: ids 0 and 3 win over 6
    assert (torch.arange(4) + d2t).tolist() == [0, 2, 3, 5]
    assert d2t.tolist() == [0, 1, 1, 2] and d2t.dtype == torch.int64
    assert t2d.tolist() == [True, False, True, True, False, True, False, False]


def test_round_trip():
    counts = torch.randint(0, 50, (300,), generator=torch.Generator().manual_seed(0))
    d2t, t2d = build_draft_vocab(counts, 64)
    target_ids = torch.arange(64) + d2t
    assert bool(t2d[target_ids].all()) and int(t2d.sum()) == 64
    assert counts[target_ids].min() >= counts[~t2d].max()


def test_full_vocabulary_is_identity():
    d2t, t2d = build_draft_vocab(torch.randint(0, 9, (40,)), 40)
    assert bool((d2t == 0).all()) and bool(t2d.all())


def test_bad_size_raises():
    with pytest.raises(ValueError, match="draft_vocab_size"):
        build_draft_vocab(torch.ones(10), 11)


def test_candidates_restrict_the_vocab():
    counts = torch.tensor([100, 90, 1, 0, 5, 0, 0, 3])
    d2t, t2d = build_draft_vocab(counts, 3, candidates=torch.tensor([4, 5, 6, 7]))
    assert (torch.arange(3) + d2t).tolist() == [4, 5, 7]  # most frequent candidates, ties to the lower id
    assert t2d.nonzero().squeeze(-1).tolist() == [4, 5, 7]
    with pytest.raises(ValueError, match="number of candidate ids"):
        build_draft_vocab(counts, 5, candidates=torch.tensor([4, 5, 6, 7]))
    with pytest.raises(ValueError, match="candidates must be target ids"):
        build_draft_vocab(counts, 1, candidates=torch.tensor([8]))
