"""Token counting over loss-masked tokens and the saved vocab's staleness check (2 ranks:
tests/distributed/test_vocab_all_reduce.py)."""
import datasets
import pytest
import torch

from data.vocab import build_and_save_vocab, count_token_frequencies, load_vocab
from tests.helpers import VOCAB_ROWS as ROWS


def test_counts_only_masked_tokens():
    ds = datasets.Dataset.from_dict(ROWS)
    expected = torch.tensor([0, 0, 2, 2, 2, 0, 0, 0])
    assert torch.equal(count_token_frequencies(ds, 8), expected)
    assert torch.equal(count_token_frequencies(ds.shuffle(seed=0), 8, num_proc=2), expected)
    with pytest.raises(ValueError, match="outside vocab_size=4"):
        count_token_frequencies(ds, 4)


def test_build_save_load_and_stale(tmp_path):
    ds = datasets.Dataset.from_dict(ROWS)
    path = str(tmp_path / "vocab" / "draft_vocab.safetensors")
    d2t, t2d, counts = build_and_save_vocab(ds, vocab_size=8, draft_vocab_size=3, path=path,
                                            fingerprint="abc")
    assert (torch.arange(3) + d2t).tolist() == [2, 3, 4] and t2d.sum() == 3
    d2t2, t2d2, counts2, meta = load_vocab(path, fingerprint="abc")
    assert torch.equal(d2t, d2t2) and torch.equal(t2d, t2d2) and torch.equal(counts, counts2)
    assert meta["dataset_fingerprint"] == "abc" and meta["num_counted_tokens"] == 6
    assert (tmp_path / "vocab" / "draft_vocab.json").exists()
    with pytest.raises(ValueError, match="stale"):
        load_vocab(path, fingerprint="def")

