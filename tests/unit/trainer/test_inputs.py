"""The Trainer's data position (trainer/inputs.py): a saved (epoch, batches done) replays exactly the batches
an uninterrupted run sees, a world-size change skips the samples already trained on, and an offline run reads
its store with the configured store.verify check."""
import json
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir

from data.batching import TokenBudgetBatchSampler
from data.store.writer import HiddenStateStoreWriter
from tests.helpers import REPO
from tools.config import register_configs
from trainer.distributed import DistInfo
from trainer.inputs import _train_batches, build_offline_data

LENGTHS = [5 + (7 * i) % 40 for i in range(60)]
ONE_RANK = DistInfo(rank=0, world_size=1, local_rank=0)


def _batches(lengths=LENGTHS, dist=ONE_RANK):
    cfg = SimpleNamespace(seed=3, trainer=SimpleNamespace(max_tokens_per_batch=64, packed=True))
    return _train_batches(lengths, lambda indices: list(indices), cfg, dist)  # fetch: the indices themselves


def _sampler_identity():
    return TokenBudgetBatchSampler(LENGTHS, 64, packed=True, seed=3).identity()


def _epoch_len():
    batches = _batches()
    next(batches)
    return len(list(batches.make_sampler(0)))


def test_saved_position_replays_the_same_batches_across_epochs():
    epoch_len = _epoch_len()
    uninterrupted = _batches()
    seen = [next(uninterrupted) for _ in range(2 * epoch_len + 3)]
    assert uninterrupted.state_dict() == {"epoch": 2, "done_in_epoch": 3, "identity": _sampler_identity()}
    assert seen[:epoch_len] != seen[epoch_len:2 * epoch_len]  # each epoch its own order

    first = _batches()
    head = [next(first) for _ in range(epoch_len + 2)]
    resumed = _batches()
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))  # as trainer_state.json stores it
    assert head + [next(resumed) for _ in range(epoch_len + 1)] == seen


def test_a_position_saved_for_other_batches_is_refused():
    saved = _batches()
    next(saved)
    other = _train_batches(LENGTHS, lambda indices: list(indices), SimpleNamespace(
        seed=3, trainer=SimpleNamespace(max_tokens_per_batch=128, packed=True)), ONE_RANK)
    with pytest.raises(ValueError, match="saved for other batches"):
        other.load_state_dict(saved.state_dict())
    legacy = {k: v for k, v in saved.state_dict().items() if k != "identity"}  # written before the check
    _batches().load_state_dict(legacy)


def test_world_size_change_skips_the_samples_already_seen():
    epoch_len = _epoch_len()
    per_old_rank = epoch_len // 2 + 1  # two old ranks together went past the end of the first epoch
    batches = _batches()
    batches.resume_from_global(per_old_rank, old_world_size=2)  # no process group: the new world size is 1
    assert batches.state_dict() == {"epoch": 1, "done_in_epoch": 2 * per_old_rank - epoch_len,
                                    "identity": _sampler_identity()}
    uninterrupted = _batches()
    for _ in range(2 * per_old_rank):
        next(uninterrupted)
    assert next(batches) == next(uninterrupted)


def test_ranks_take_disjoint_batches_and_an_empty_split_is_named():
    ranks = [_batches(dist=DistInfo(rank=r, world_size=2, local_rank=r)) for r in range(2)]
    first = [next(b) for b in ranks]
    assert not set(first[0]) & set(first[1])
    with pytest.raises(ValueError, match="yields no batch"):
        next(_batches(lengths=[]))


# ---- offline data: store.verify reaches the reader ----
HIDDEN, VOCAB, TOPK, TAIL = 256, 8192, 8, 4  # the tiny chat target's sizes


def _write_store(path, num_samples=6):
    writer = HiddenStateStoreWriter(str(path), "compact", HIDDEN, 3, [2, 4, 5], VOCAB, "tiny", topk=TOPK,
                                    tail_samples=TAIL)
    g = torch.Generator().manual_seed(0)
    for i in range(num_samples):
        n = 4 + i
        writer.add(input_ids=torch.randint(0, VOCAB, (n,), generator=g),
                   loss_mask=torch.ones(n, dtype=torch.long),
                   aux_hidden_states=torch.randn(n, 3 * HIDDEN, generator=g),
                   teacher_topk_logprobs=-torch.rand(n, TOPK, generator=g),
                   teacher_topk_ids=torch.randint(0, VOCAB, (n, TOPK), generator=g),
                   teacher_tail_ids=torch.randint(0, VOCAB, (n, TAIL), generator=g),
                   teacher_argmax=torch.randint(0, VOCAB, (n,), generator=g), sample_id=f"s{i}")
    writer.close()
    return writer.manifest


def _flip_a_hidden_state_byte(shard):
    """Change one byte inside the aux_hidden_states tensor: same size, offsets intact, values wrong."""
    raw = bytearray(shard.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    start, _ = json.loads(raw[8:8 + header_len])["aux_hidden_states"]["data_offsets"]
    raw[8 + header_len + start + 5] ^= 0x01
    shard.write_bytes(bytes(raw))


def _offline_cfg(tmp_path, verify):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="train", overrides=[
            f"run_dir={tmp_path / 'run'}", f"store.path={tmp_path / 'store'}", f"store.verify={verify}",
            "trainer.mode=offline", "draft.draft_vocab_size=64", "trainer.max_tokens_per_batch=1024"])


def test_store_verify_sha256_catches_a_corrupted_shard_that_size_reads_silently(tmp_path, hydra_restore):
    manifest = _write_store(tmp_path / "store" / "train")
    _flip_a_hidden_state_byte(tmp_path / "store" / "train" / manifest["shards"][0]["file"])
    with pytest.raises(ValueError, match="corrupt shard \\(sha256 mismatch\\)"):
        build_offline_data(_offline_cfg(tmp_path, "sha256"), ONE_RANK)
    data = build_offline_data(_offline_cfg(tmp_path, "size"), ONE_RANK)  # the size check cannot see it
    assert data.vocab["d2t"].numel() == 64 and next(data.train_batches)["input_ids"].numel() > 0
