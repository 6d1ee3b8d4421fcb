"""The hidden-state store's format: layouts, manifest, fp8 quantisation, tail sampling, the checked shard
open.

A store holds target activations dumped once (tools/dump.py), streamed back for offline draft training.

A store is a directory of safetensors shards plus ``manifest.json``.  Each shard holds consecutive samples
concatenated along the token axis (``offsets`` gives the sample boundaries).  Layouts:
- "full":    bf16 aux states (num_aux*H) + bf16 last hidden state (H)             = 8*H bytes/token (3 aux)
- "compact": fp8 e4m3 aux states with a float32 scale per token and layer, the teacher's top-k log-probs
             (fp16) and their target ids, ``tail_samples`` target ids drawn from the rest of the teacher
             distribution (systematic sampling, each worth (1 - top-k mass) / tail_samples: with the top-k
             entries an unbiased estimate of the whole distribution), ids int16 when vocab < 32768 else
             int32, and the teacher's full-vocab argmax.  k=8, 36 samples: 3.49*H bytes/token at H=256,
             3.05*H at H=4096 (ids, mask included).
             Version 1 compact stores (top-k only: the teacher renormalised over it) are still read.
Shards are written to a temporary name and renamed, then the manifest is replaced, so a crash loses at most
the shard being filled; reopening the writer resumes after the last complete shard.  Sizes and sha256 are
recorded; the reader refuses truncated or corrupt shards.
"""
from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

FP8_MAX = 448.0  # largest finite torch.float8_e4m3fn
MANIFEST = "manifest.json"
LAYOUTS = ("compact", "full")
VERSION = 2  # 2: compact with teacher_tail_ids; stores without them are still written as version 1


@dataclass
class StoreConfig:
    path: str = ""
    layout: str = "compact"            # compact | full
    topk: int = 8                      # teacher log-probs kept per position (compact)
    tail_samples: int = 36             # ids sampled from the teacher's mass outside the top-k (compact)
    shard_bytes: int = 512 << 20       # a shard is closed once it holds this much
    batch_max_tokens: int = 4096       # padded tokens per target forward in run_dump
    verify: str = "size"               # reader check per shard: size | sha256


def quantize_fp8(x: Tensor, num_groups: int):
    """(T, G*H) -> fp8 values (T, G*H) and float32 scales (T, G), one scale per token and group."""
    grouped = x.float().reshape(x.shape[0], num_groups, -1)
    scales = grouped.abs().amax(-1).clamp_min(1e-12) / FP8_MAX
    q = (grouped / scales[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.reshape(x.shape), scales


def dequantize_fp8(q: Tensor, scales: Tensor, dtype=torch.float32) -> Tensor:
    grouped = q.float().reshape(q.shape[0], scales.shape[1], -1) * scales.float()[..., None]
    return grouped.reshape(q.shape).to(dtype)


def bytes_per_token(layout: str, hidden_size: int, num_aux_layers: int = 3, vocab_size: int = 32000,
                    topk: int = 8, include_tokens: bool = True, tail_samples: int = 36) -> int:
    """Stored bytes per token (include_tokens adds input_ids int32 + loss_mask uint8)."""
    if layout == "full":
        size = 2 * num_aux_layers * hidden_size + 2 * hidden_size
    elif layout == "compact":
        index_bytes = 2 if vocab_size < 32768 else 4
        size = (num_aux_layers * hidden_size + 4 * num_aux_layers + topk * (2 + index_bytes)
                + tail_samples * index_bytes + 4)
    else:
        raise ValueError(f"store layout {layout!r} unknown; choose {' or '.join(LAYOUTS)}")
    return size + (5 if include_tokens else 0)


def sample_tail(logprobs: Tensor, topk_index: Tensor, num_samples: int,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """(T, V) log-probs, (T, k) top-k columns -> (T, num_samples) columns drawn from the mass outside the
    top-k.

    Systematic sampling along the vocabulary: column i is drawn num_samples * p_i / tail times in expectation
    (tail = mass outside the top-k), so the top-k probabilities plus tail / num_samples per drawn column are
    an unbiased estimate of the distribution.  Columns with p_i >= tail / num_samples are always drawn.
    """
    probs = logprobs.float().exp().scatter(-1, topk_index, 0.0)
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    points = (u + torch.arange(num_samples, device=probs.device)) / num_samples * cdf[:, -1:]
    return torch.searchsorted(cdf, points, right=True).clamp_max(probs.shape[-1] - 1)


def open_shard(file: str, entry: dict, verify: str = "size"):
    """(safetensors handle, sample offsets) of a shard, checked against its manifest entry first: present, of
    the recorded size (and sha256 with verify="sha256"), offsets agreeing with its sample and token counts."""
    from safetensors import SafetensorError, safe_open

    if not os.path.isfile(file):
        raise ValueError(f"{file}: shard listed in the manifest is missing")
    size = os.path.getsize(file)
    if size != entry["bytes"]:
        raise ValueError(f"{file}: truncated or corrupt shard ({size} bytes, manifest says {entry['bytes']})")
    if verify == "sha256":
        digest = hashlib.sha256()
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        if digest.hexdigest() != entry["sha256"]:
            raise ValueError(f"{file}: corrupt shard (sha256 mismatch)")
    try:
        handle = safe_open(file, framework="pt")
        offsets = handle.get_tensor("offsets").tolist()
    except SafetensorError as e:
        raise ValueError(f"{file}: corrupt shard ({e})") from e
    if len(offsets) != entry["num_samples"] + 1 or offsets[-1] != entry["num_tokens"]:
        raise ValueError(f"{file}: corrupt shard (offsets disagree with the manifest)")
    return handle, offsets
