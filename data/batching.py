"""Token-budget micro-batches (length-grouped or packed), rank sharding with exact mid-epoch resume, and
collation.

Every rank builds the same global batch list from (seed, epoch, lengths) and takes every world_size-th batch;
the list is padded by wrapping around so that all ranks get the same number of batches.
"""
from __future__ import annotations

import hashlib
import random
from typing import Dict, Iterator, List, Optional, Sequence

import torch


class TokenBudgetBatchSampler:
    """Yields lists of dataset indices whose padded (or packed) size stays within `max_tokens_per_batch`.

    grouped: samples sorted by length inside mega-buckets of `mega_bucket_size`, cut into rows of B samples
    with B * max_len <= budget.  packed: first-fit-decreasing inside each mega-bucket, one row of <= budget
    tokens per micro-batch.  A sample longer than the budget forms its own batch (collate truncates it).
    """

    def __init__(self, lengths: Sequence[int], max_tokens_per_batch: int, packed: bool = False,
                 shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1,
                 mega_bucket_size: int = 4096):
        if max_tokens_per_batch <= 0:
            raise ValueError(f"max_tokens_per_batch must be positive, got {max_tokens_per_batch}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.lengths = [int(x) for x in lengths]
        self.max_tokens_per_batch = max_tokens_per_batch
        self.packed, self.shuffle, self.seed = packed, shuffle, seed
        self.rank, self.world_size, self.mega_bucket_size = rank, world_size, mega_bucket_size
        self.epoch = 0
        self._batches: Optional[List[List[int]]] = None
        self._batches_epoch = -1

    def _global_batches(self) -> List[List[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        batches: List[List[int]] = []
        budget = self.max_tokens_per_batch
        for b in range(0, len(order), self.mega_bucket_size):
            bucket = sorted(order[b: b + self.mega_bucket_size], key=lambda i: (-self.lengths[i], i))
            if self.packed:
                rows: List[List[int]] = []
                free: List[int] = []
                for i in bucket:
                    need = min(self.lengths[i], budget)
                    slot = next((r for r, room in enumerate(free) if room >= need), None)
                    if slot is None:
                        rows.append([i])
                        free.append(budget - need)
                    else:
                        rows[slot].append(i)
                        free[slot] -= need
                batches.extend(rows)
            else:
                current: List[int] = []
                for i in bucket:  # descending length: the first sample of a batch sets its width
                    width = self.lengths[current[0]] if current else self.lengths[i]
                    if current and width * (len(current) + 1) > budget:
                        batches.append(current)
                        current = []
                    current.append(i)
                if current:
                    batches.append(current)
        if self.shuffle:
            rng.shuffle(batches)
        if batches and len(batches) % self.world_size:
            pad = self.world_size - len(batches) % self.world_size
            batches += [batches[k % len(batches)] for k in range(pad)]
        return batches

    def _rank_batches(self) -> List[List[int]]:
        if self._batches_epoch != self.epoch:
            self._batches = self._global_batches()[self.rank:: self.world_size]
            self._batches_epoch = self.epoch
        return self._batches

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self._rank_batches())

    def __iter__(self) -> Iterator[List[int]]:
        for batch in self._rank_batches():
            yield list(batch)

    def identity(self) -> str:
        """What the batches depend on, hashed: a resumed epoch replays its batches only if it is unchanged."""
        key = repr((self.lengths, self.max_tokens_per_batch, self.packed, self.shuffle, self.seed,
                    self.world_size, self.mega_bucket_size))
        return hashlib.sha256(key.encode()).hexdigest()[:16]


def collate(samples: List[dict], packed: bool, max_tokens: int, pad_token_id: int = 0,
            pad_to_multiple_of: int = 1) -> Dict[str, torch.Tensor]:
    """Batch tensors (contract layout): input_ids, loss_mask, position_ids, document_ids (-1 on padding).

    packed: all samples in one row (each truncated so the row fits max_tokens); otherwise one row per sample,
    each truncated to max_tokens and right-padded to the longest.
    """
    def ids(sample, key):
        value = sample[key]
        return value.tolist() if isinstance(value, torch.Tensor) else list(value)

    if packed:
        rows = [[]]
        room = max_tokens
        for doc, s in enumerate(samples):
            take = min(len(s["input_ids"]), room)
            if take == 0:
                break
            rows[0].append((doc, ids(s, "input_ids")[:take], ids(s, "loss_mask")[:take]))
            room -= take
    else:
        rows = [[(0, ids(s, "input_ids")[:max_tokens], ids(s, "loss_mask")[:max_tokens])] for s in samples]
    width = max(sum(len(p[1]) for p in row) for row in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    shape = (len(rows), width)
    batch = {"input_ids": torch.full(shape, pad_token_id, dtype=torch.long),
             "loss_mask": torch.zeros(shape, dtype=torch.long),
             "position_ids": torch.zeros(shape, dtype=torch.long),
             "document_ids": torch.full(shape, -1, dtype=torch.long)}
    for r, row in enumerate(rows):
        t = 0
        for doc, input_ids, loss_mask in row:
            n = len(input_ids)
            batch["input_ids"][r, t: t + n] = torch.tensor(input_ids, dtype=torch.long)
            batch["loss_mask"][r, t: t + n] = torch.tensor(loss_mask, dtype=torch.long)
            batch["position_ids"][r, t: t + n] = torch.arange(n)
            batch["document_ids"][r, t: t + n] = doc
            t += n
    return batch
