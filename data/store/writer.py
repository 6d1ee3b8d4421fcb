"""Writes a hidden-state store (data/store/format.py): shards atomically, then the manifest; resumes on
reopen."""
from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Dict, List, Optional

import torch
from torch import Tensor

from data.io import atomic_write_bytes
from data.store.format import LAYOUTS, MANIFEST, VERSION, bytes_per_token, quantize_fp8


class HiddenStateStoreWriter:
    """Appends samples in order; reopening an existing store resumes after its last complete shard."""

    def __init__(self, path: str, layout: str, hidden_size: int, num_aux_layers: int,
                 aux_layer_ids: List[int], vocab_size: int, target_fingerprint: str, topk: int = 8,
                 shard_bytes: int = 512 << 20, dataset_fingerprint: str = "", tail_samples: int = 36):
        if layout not in LAYOUTS:
            raise ValueError(f"store layout {layout!r} unknown; choose {' or '.join(LAYOUTS)}")
        if topk < 1 or tail_samples < 0:
            raise ValueError(f"store topk must be >= 1 and tail_samples >= 0, got {topk} and {tail_samples}")
        self.path, self.layout, self.shard_bytes = path, layout, shard_bytes
        tail_samples = tail_samples if layout == "compact" else 0
        header = {"format": "aerie-hidden-states", "version": VERSION if tail_samples else 1,
                  "layout": layout, "hidden_size": hidden_size, "num_aux_layers": num_aux_layers,
                  "aux_layer_ids": list(aux_layer_ids),
                  "vocab_size": vocab_size, "target_fingerprint": target_fingerprint,
                  "dataset_fingerprint": dataset_fingerprint,
                  "aux_dtype": "bfloat16" if layout == "full" else "float8_e4m3fn",
                  "topk": topk if layout == "compact" else 0, "teacher_vocab": "full",  # over every target id
                  "tail_samples": tail_samples,
                  "topk_index_dtype": "int16" if vocab_size < 32768 else "int32"}
        os.makedirs(path, exist_ok=True)
        manifest_path = os.path.join(path, MANIFEST)
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                self.manifest = json.load(f)
            self.manifest.setdefault("tail_samples", 0)  # written by a version 1 writer
            changed = [k for k, v in header.items() if self.manifest.get(k) != v]
            if changed:
                raise ValueError(f"{manifest_path}: existing store differs in {changed}; use another path or "
                                 "delete it")
        else:
            self.manifest = {**header, "shards": [], "sample_ids": [], "sample_lengths": []}
        for stray in glob.glob(os.path.join(path, "*.tmp*")):
            os.remove(stray)  # an interrupted shard or manifest write
        self._buffer: List[Dict[str, Tensor]] = []
        self._buffer_ids: List[str] = []
        self._buffer_bytes = 0
        self._bytes_per_token = bytes_per_token(layout, hidden_size, num_aux_layers, vocab_size, topk,
                                                tail_samples=header["tail_samples"])

    @property
    def num_samples(self) -> int:
        """Samples in complete shards (what a resumed run skips)."""
        return len(self.manifest["sample_ids"])

    def add(self, input_ids: Tensor, loss_mask: Tensor, aux_hidden_states: Tensor,
            last_hidden_state: Optional[Tensor] = None, teacher_topk_logprobs: Optional[Tensor] = None,
            teacher_topk_ids: Optional[Tensor] = None, teacher_argmax: Optional[Tensor] = None,
            teacher_tail_ids: Optional[Tensor] = None, sample_id: Optional[str] = None) -> None:
        """One sample: input_ids/loss_mask (L,), aux_hidden_states (L, num_aux*H), then last_hidden_state (L,
        H) for "full", or teacher_topk_logprobs/ids (L, k), teacher_tail_ids (L, tail_samples) and
        teacher_argmax (L,) for "compact"."""
        m = self.manifest
        length = input_ids.shape[0]
        if aux_hidden_states.shape != (length, m["num_aux_layers"] * m["hidden_size"]):
            raise ValueError(f"aux_hidden_states shape {tuple(aux_hidden_states.shape)} != "
                             f"({length}, {m['num_aux_layers'] * m['hidden_size']})")
        sample = {"input_ids": input_ids.detach().cpu().to(torch.int32),
                  "loss_mask": loss_mask.detach().cpu().to(torch.uint8)}
        if self.layout == "full":
            if last_hidden_state is None or last_hidden_state.shape != (length, m["hidden_size"]):
                raise ValueError("full layout needs last_hidden_state of shape (L, hidden_size)")
            sample["aux_hidden_states"] = aux_hidden_states.detach().cpu().to(torch.bfloat16)
            sample["last_hidden_state"] = last_hidden_state.detach().cpu().to(torch.bfloat16)
        else:
            if teacher_topk_logprobs is None or teacher_topk_ids is None or teacher_argmax is None:
                raise ValueError("compact layout needs teacher_topk_logprobs, teacher_topk_ids and "
                                 "teacher_argmax")
            if teacher_topk_logprobs.shape != (length, m["topk"]):
                raise ValueError(f"teacher_topk_logprobs shape {tuple(teacher_topk_logprobs.shape)} != "
                                 f"({length}, {m['topk']})")
            tail = m["tail_samples"]
            if tail and (teacher_tail_ids is None or teacher_tail_ids.shape != (length, tail)):
                got = None if teacher_tail_ids is None else tuple(teacher_tail_ids.shape)
                raise ValueError(f"compact layout with tail_samples={tail} needs teacher_tail_ids of shape "
                                 f"({length}, {tail}), got {got}")
            q, scales = quantize_fp8(aux_hidden_states.detach().cpu(), m["num_aux_layers"])
            index_dtype = torch.int16 if m["topk_index_dtype"] == "int16" else torch.int32
            sample.update(aux_hidden_states=q, aux_scales=scales,
                          teacher_topk_logprobs=teacher_topk_logprobs.detach().cpu().to(torch.float16),
                          teacher_topk_ids=teacher_topk_ids.detach().cpu().to(index_dtype),
                          teacher_argmax=teacher_argmax.detach().cpu().to(torch.int32))
            if tail:
                sample["teacher_tail_ids"] = teacher_tail_ids.detach().cpu().to(index_dtype)
        self._buffer.append(sample)
        self._buffer_ids.append(str(sample_id) if sample_id is not None
                                else str(self.num_samples + len(self._buffer_ids)))
        self._buffer_bytes += length * self._bytes_per_token
        if self._buffer_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Writes the buffered samples as one shard (atomic), then the manifest."""
        if not self._buffer:
            return
        from safetensors.torch import save

        lengths = [s["input_ids"].shape[0] for s in self._buffer]
        tensors = {k: torch.cat([s[k] for s in self._buffer]).contiguous() for k in self._buffer[0]}
        tensors["offsets"] = torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0)
        data = save(tensors, metadata={"first_sample": str(self.num_samples)})
        m = self.manifest
        name = f"shard-{len(m['shards']):05d}.safetensors"
        atomic_write_bytes(os.path.join(self.path, name), data)
        m["shards"].append({"file": name, "first_sample": self.num_samples, "num_samples": len(lengths),
                            "num_tokens": sum(lengths), "bytes": len(data),
                            "sha256": hashlib.sha256(data).hexdigest()})
        m["sample_ids"] += self._buffer_ids
        m["sample_lengths"] += lengths
        atomic_write_bytes(os.path.join(self.path, MANIFEST), json.dumps(m).encode())
        self._buffer, self._buffer_ids, self._buffer_bytes = [], [], 0

    def close(self) -> None:
        self.flush()
