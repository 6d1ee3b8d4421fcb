"""Token counting across 2 gloo ranks: each rank counts half the rows and every rank ends with the sums."""
import datasets
import pytest
import torch

from data.vocab import build_and_save_vocab, load_vocab
from tests.helpers import VOCAB_ROWS as ROWS


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
    # each rank counted half the rows, sums agree everywhere
    expected = torch.tensor([0, 0, 2, 2, 2, 0, 0, 0])
    for rank in range(2):
        assert torch.equal(torch.load(tmp_path / f"counts.{rank}"), expected)
    assert torch.equal(load_vocab(path, "fp")[2], expected)
