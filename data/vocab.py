"""Token frequencies over loss-masked tokens and the saved draft vocabulary (d2t / t2d) with a staleness
check.

Saved as one safetensors file (d2t, t2d, counts; the dataset fingerprint in its metadata, written atomically)
and a JSON sidecar for people.  Loading with a different fingerprint raises ValueError: the vocab is stale.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Tuple

import numpy as np
import torch
from torch import Tensor

from data.io import atomic_write_bytes, atomic_write_text, safetensors_bytes


def _count_arrow_batches(batches, vocab_size: int) -> np.ndarray:
    import pyarrow.compute as pc

    counts = np.zeros(vocab_size, dtype=np.int64)
    for batch in batches:
        ids = pc.list_flatten(batch.column("input_ids")).to_numpy()
        mask = pc.list_flatten(batch.column("loss_mask")).to_numpy()
        ids = ids[mask != 0]
        if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
            raise ValueError(f"token id {int(ids.max())} outside vocab_size={vocab_size}")
        counts += np.bincount(ids, minlength=vocab_size)
    return counts


def _count_batch(table, vocab_size: int) -> dict:
    return {"counts": [_count_arrow_batches([table], vocab_size)]}


def count_token_frequencies(dataset, vocab_size: int, num_proc: int = 1) -> Tensor:
    """(vocab_size,) int64 counts of loss-masked input ids; summed over ranks when torch.distributed is up.

    Each rank counts its shard of the dataset (dataset.shard(world_size, rank)); num_proc > 1 splits that
    shard over worker processes with datasets.map.
    """
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    if distributed and dist.get_world_size() > 1:
        dataset = dataset.shard(dist.get_world_size(), dist.get_rank(), contiguous=True)
    dataset = dataset.select_columns(["input_ids", "loss_mask"]).with_format("arrow")
    if num_proc > 1 and len(dataset) >= num_proc:
        per_batch = dataset.map(_count_batch, batched=True, batch_size=max(1, -(-len(dataset) // num_proc)),
                                num_proc=num_proc, remove_columns=dataset.column_names,
                                fn_kwargs={"vocab_size": vocab_size}, desc="counting tokens")
        counts = np.sum(np.asarray(per_batch.with_format(None)["counts"], dtype=np.int64), axis=0)
    else:
        counts = _count_arrow_batches(dataset.iter(batch_size=4096), vocab_size)
    result = torch.from_numpy(np.asarray(counts, dtype=np.int64))
    if distributed:
        backend_device = "cuda" if dist.get_backend() == "nccl" else "cpu"
        result = result.to(backend_device)
        dist.all_reduce(result)
        result = result.cpu()
    return result


def build_draft_vocab(token_counts: Tensor, draft_vocab_size: int,
                      candidates: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """The draft_vocab_size most frequent ids (ties -> lower id), ascending by target id; returns (d2t, t2d).

    candidates: the only target ids allowed in (e.g. a TTS LM's speech tokens); None allows every id."""
    if token_counts.dim() != 1:
        raise ValueError(f"token_counts must be 1-D (vocab_size,), got shape {tuple(token_counts.shape)}")
    vocab_size = token_counts.numel()
    limit = vocab_size if candidates is None else int(candidates.unique().numel())
    if not 1 <= draft_vocab_size <= limit:
        raise ValueError(f"draft_vocab_size={draft_vocab_size} must be in [1, {limit}] "
                         f"({'vocab_size' if candidates is None else 'number of candidate ids'})")
    counts = token_counts.detach().cpu().long()
    if candidates is not None:
        if int(candidates.min()) < 0 or int(candidates.max()) >= vocab_size:
            raise ValueError(f"draft vocab candidates must be target ids in [0, {vocab_size})")
        allowed = torch.zeros(vocab_size, dtype=torch.bool)
        allowed[candidates.long().cpu()] = True
        counts = torch.where(allowed, counts, torch.full_like(counts, -1))
    # stable sort on -count keeps lower ids first among equal counts
    order = torch.sort(-counts, stable=True).indices
    target_ids = order[:draft_vocab_size].sort().values
    d2t = target_ids - torch.arange(draft_vocab_size)
    t2d = torch.zeros(vocab_size, dtype=torch.bool)
    t2d[target_ids] = True
    return d2t, t2d


def save_vocab(path: str, d2t: Tensor, t2d: Tensor, counts: Tensor, fingerprint: str,
               metadata: Optional[dict] = None) -> None:
    meta = {"dataset_fingerprint": fingerprint, "draft_vocab_size": int(d2t.numel()),
            "vocab_size": int(t2d.numel()), "num_counted_tokens": int(counts.sum()), **(metadata or {})}
    atomic_write_bytes(path, safetensors_bytes({"d2t": d2t.long(), "t2d": t2d.bool(),
                                                "counts": counts.long()},
                                               metadata={"aerie": json.dumps(meta)}))
    atomic_write_text(f"{os.path.splitext(path)[0]}.json", json.dumps(meta, indent=1))


def load_vocab(path: str, fingerprint: Optional[str] = None) -> Tuple[Tensor, Tensor, Tensor, dict]:
    """(d2t, t2d, counts, metadata); ValueError when `fingerprint` is given and differs from the saved one."""
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ValueError(f"draft vocab file {path} does not exist")
    with safe_open(path, framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("aerie", "{}"))
        tensors = {k: f.get_tensor(k) for k in ("d2t", "t2d", "counts")}
    if fingerprint is not None and meta.get("dataset_fingerprint") != fingerprint:
        raise ValueError(f"draft vocab {path} is stale: built for dataset fingerprint "
                         f"{meta.get('dataset_fingerprint')!r}, current data is {fingerprint!r}; rebuild it")
    return tensors["d2t"], tensors["t2d"], tensors["counts"], meta


def build_and_save_vocab(dataset, vocab_size: int, draft_vocab_size: int, path: str, fingerprint: str,
                         num_proc: int = 1, candidates: Optional[Tensor] = None
                         ) -> Tuple[Tensor, Tensor, Tensor]:
    """Counts, builds the draft vocab (build_draft_vocab) and saves it (rank 0 only); returns (d2t, t2d,
    counts).

    candidates: the target ids the draft vocab may hold (the modality adapter's; None: any)."""
    import torch.distributed as dist

    counts = count_token_frequencies(dataset, vocab_size, num_proc)
    d2t, t2d = build_draft_vocab(counts, min(draft_vocab_size, vocab_size), candidates)
    distributed = dist.is_available() and dist.is_initialized()
    if not distributed or dist.get_rank() == 0:
        save_vocab(path, d2t, t2d, counts, fingerprint)
    if distributed:
        dist.barrier()
    return d2t, t2d, counts
