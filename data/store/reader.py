"""Reads a hidden-state store (data/store/format.py) back: streamed shard by shard or by random access, each
shard checked once against its manifest entry (data/store/format.open_shard)."""
from __future__ import annotations

import glob
import json
import os
from typing import Dict, Iterator, List, Tuple

import torch
from torch import Tensor

from data.store.format import MANIFEST, VERSION, dequantize_fp8, open_shard


def _store_dirs(path: str) -> List[str]:
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return [path]
    parts = sorted(os.path.dirname(p) for p in glob.glob(os.path.join(path, "part-*", MANIFEST)))
    if not parts:
        raise ValueError(f"{path}: no hidden-state store ({MANIFEST} or part-*/{MANIFEST}) found")
    return parts


class HiddenStateStoreReader:
    """Streams samples shard by shard (memory-mapped slices, never the whole store).

    Rank r of world_size w gets the samples whose global index i satisfies i % w == r; yields dicts with
    input_ids, loss_mask (long), aux_hidden_states (dequantised to `dtype`), and last_hidden_state (full) or
    teacher_topk_logprobs (float32), teacher_topk_ids, teacher_argmax, teacher_tail_ids (long; absent in
    version 1 stores) (compact), plus "id".
    dequantize=False (compact) yields the fp8 aux_hidden_states with their aux_scales instead, so that the
    consumer can dequantize_fp8 on its accelerator (CPU fp8 conversion is the reader's bottleneck).
    """

    def __init__(self, path: str, rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32,
                 verify: str = "size", dequantize: bool = True):
        if verify not in ("size", "sha256"):
            raise ValueError(f"store.verify={verify!r}: unknown; choose size or sha256")
        self.rank, self.world_size, self.dtype, self.verify = rank, world_size, dtype, verify
        self.dequantize = dequantize
        self.parts = []
        for d in _store_dirs(path):
            with open(os.path.join(d, MANIFEST)) as f:
                m = json.load(f)
            if m.get("version") not in (1, VERSION):
                raise ValueError(f"{d}: hidden-state store version {m.get('version')} is not readable by "
                                 f"this Aerie (reads versions 1 to {VERSION}); dump it again")
            m.setdefault("tail_samples", 0)  # version 1
            self.parts.append((d, m))
        self.manifest = self.parts[0][1]
        keys = ("layout", "hidden_size", "num_aux_layers", "aux_layer_ids", "target_fingerprint", "topk",
                "tail_samples")
        for d, m in self.parts[1:]:
            if any(m[k] != self.manifest[k] for k in keys):
                raise ValueError(f"{d}: store part does not match {self.parts[0][0]} in {keys}")
        self.all_lengths = [n for _, m in self.parts for n in m["sample_lengths"]]

    def lengths(self) -> List[int]:
        return self.all_lengths[self.rank:: self.world_size]

    def __len__(self) -> int:
        return len(self.lengths())

    def __iter__(self) -> Iterator[Dict[str, Tensor]]:
        from safetensors import SafetensorError

        global_index = 0
        for d, m in self.parts:
            for entry in m["shards"]:
                first = global_index
                global_index += entry["num_samples"]
                mine = [i for i in range(entry["num_samples"]) if (first + i) % self.world_size == self.rank]
                if not mine:
                    continue
                file = os.path.join(d, entry["file"])
                handle, offsets = open_shard(file, entry, self.verify)
                try:
                    slices = {k: handle.get_slice(k) for k in handle.keys() if k != "offsets"}
                    for i in mine:
                        a, b = offsets[i], offsets[i + 1]
                        yield self._sample({k: s[a:b] for k, s in slices.items()},
                                           m["sample_ids"][entry["first_sample"] + i])
                except SafetensorError as e:
                    raise ValueError(f"{file}: corrupt shard ({e})") from e

    def _locate(self, index: int):
        """(part dir, manifest, shard entry, index within the shard) of global sample `index`."""
        if not hasattr(self, "_table"):
            self._table = [(d, m, entry) for d, m in self.parts for entry in m["shards"]]
            self._firsts, first = [], 0
            for _, _, entry in self._table:
                self._firsts.append(first)
                first += entry["num_samples"]
            self._open: Dict[str, object] = {}
        import bisect

        if not 0 <= index < len(self.all_lengths):
            raise IndexError(f"sample {index} outside the store's {len(self.all_lengths)} samples")
        slot = bisect.bisect_right(self._firsts, index) - 1
        d, m, entry = self._table[slot]
        return d, m, entry, index - self._firsts[slot]

    def sample(self, index: int) -> Dict[str, Tensor]:
        """Random access to global sample `index`; shards stay memory-mapped once opened (checked on first
        use)."""
        from safetensors import SafetensorError

        d, m, entry, local = self._locate(index)
        file = os.path.join(d, entry["file"])
        if file not in self._open:
            self._open[file] = open_shard(file, entry, self.verify)
        try:
            handle, offsets = self._open[file]
            a, b = offsets[local], offsets[local + 1]
            tensors = {k: handle.get_slice(k)[a:b] for k in handle.keys() if k != "offsets"}
        except SafetensorError as e:
            raise ValueError(f"{file}: corrupt shard ({e})") from e
        return self._sample(tensors, m["sample_ids"][entry["first_sample"] + local])

    def token_rows(self) -> Iterator[Tuple[Tensor, Tensor]]:
        """(input_ids, loss_mask) of every sample in store order, reading only those two tensors."""
        for d, m in self.parts:
            for entry in m["shards"]:
                handle, offsets = open_shard(os.path.join(d, entry["file"]), entry, self.verify)
                ids, mask = handle.get_tensor("input_ids").long(), handle.get_tensor("loss_mask").long()
                for a, b in zip(offsets[:-1], offsets[1:]):
                    yield ids[a:b], mask[a:b]

    def _sample(self, t: Dict[str, Tensor], sample_id: str) -> Dict[str, Tensor]:
        out = {"id": sample_id, "input_ids": t["input_ids"].long(), "loss_mask": t["loss_mask"].long()}
        if self.manifest["layout"] == "full":
            out["aux_hidden_states"] = t["aux_hidden_states"].to(self.dtype)
            out["last_hidden_state"] = t["last_hidden_state"].to(self.dtype)
        elif not self.dequantize:
            out["aux_hidden_states"], out["aux_scales"] = t["aux_hidden_states"], t["aux_scales"]
        else:
            out["aux_hidden_states"] = dequantize_fp8(t["aux_hidden_states"], t["aux_scales"], self.dtype)
        if self.manifest["layout"] == "compact":
            out["teacher_topk_logprobs"] = t["teacher_topk_logprobs"].float()
            out["teacher_topk_ids"] = t["teacher_topk_ids"].long()
            out["teacher_argmax"] = t["teacher_argmax"].long()
            if "teacher_tail_ids" in t:
                out["teacher_tail_ids"] = t["teacher_tail_ids"].long()
        return out
