"""Token counting over loss-masked tokens (single and multi-process) and the saved vocab's staleness check."""
import datasets
import pytest
import torch

from data.vocab import build_and_save_vocab, count_token_frequencies, load_vocab

ROWS = {"input_ids": [[1, 2, 3, 3], [3, 4, 4, 0], [5, 5], [2]],
        "loss_mask": [[0, 1, 1, 1], [0, 1, 1, 0], [0, 0], [1]]}


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
    d2t, t2d, counts = build_and_save_vocab(ds, vocab_size=8, draft_vocab_size=3, path=path, fingerprint="abc")
    assert (torch.arange(3) + d2t).tolist() == [2, 3, 4] and t2d.sum() == 3
    d2t2, t2d2, counts2, meta = load_vocab(path, fingerprint="abc")
    assert torch.equal(d2t, d2t2) and torch.equal(t2d, t2d2) and torch.equal(counts, counts2)
    assert meta["dataset_fingerprint"] == "abc" and meta["num_counted_tokens"] == 6
    assert (tmp_path / "vocab" / "draft_vocab.json").exists()
    with pytest.raises(ValueError, match="stale"):
        load_vocab(path, fingerprint="def")


def _rank_main(rank, world_size, init_file, path, result_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        d2t, t2d, counts = build_and_save_vocab(datasets.Dataset.from_dict(ROWS), 8, 3, path, "fp")
        torch.save(counts, f"{result_file}.{rank}")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.distributed
def test_counts_all_reduced_across_ranks(tmp_path):
    import torch.multiprocessing as mp

    path = str(tmp_path / "v.safetensors")
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), path, str(tmp_path / "counts")), nprocs=2)
    expected = torch.tensor([0, 0, 2, 2, 2, 0, 0, 0])  # each rank counted half the rows, sums agree everywhere
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"counts.{rank}"), expected)
    assert torch.equal(load_vocab(path, "fp")[2], expected)
