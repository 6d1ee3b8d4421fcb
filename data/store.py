"""Offline hidden-state store: target activations dumped once, streamed back for offline draft training.

A store is a directory of safetensors shards plus ``manifest.json``.  Each shard holds consecutive samples
concatenated along the token axis (``offsets`` gives the sample boundaries).  Layouts:
- "full":    bf16 aux states (num_aux*H) + bf16 last hidden state (H)                       = 8*H bytes/token (3 aux)
- "compact": fp8 e4m3 aux states with a float32 scale per token and layer, the teacher's top-k log-probs (fp16)
             and their target ids, ``tail_samples`` target ids drawn from the rest of the teacher distribution
             (systematic sampling, each worth (1 - top-k mass) / tail_samples: with the top-k entries an unbiased
             estimate of the whole distribution), ids int16 when vocab < 32768 else int32, and the teacher's
             full-vocab argmax.  k=8, 36 samples: 3.49*H bytes/token at H=256, 3.05*H at H=4096 (ids, mask included).
             Version 1 compact stores (top-k only: the teacher renormalised over it) are still read.
Shards are written to a temporary name and renamed, then the manifest is replaced, so a crash loses at most the
shard being filled; reopening the writer resumes after the last complete shard.  Sizes and sha256 are recorded;
the reader refuses truncated or corrupt shards.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from dataclasses import asdict, dataclass, is_dataclass
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from data.io import atomic_write_bytes

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


class HiddenStateStoreWriter:
    """Appends samples in order; reopening an existing store resumes after its last complete shard."""

    def __init__(self, path: str, layout: str, hidden_size: int, num_aux_layers: int, aux_layer_ids: List[int],
                 vocab_size: int, target_fingerprint: str, topk: int = 8, shard_bytes: int = 512 << 20,
                 dataset_fingerprint: str = "", teacher_vocab: str = "full", tail_samples: int = 36):
        if layout not in LAYOUTS:
            raise ValueError(f"store layout {layout!r} unknown; choose {' or '.join(LAYOUTS)}")
        if topk < 1 or tail_samples < 0:
            raise ValueError(f"store topk must be >= 1 and tail_samples >= 0, got {topk} and {tail_samples}")
        self.path, self.layout, self.shard_bytes = path, layout, shard_bytes
        tail_samples = tail_samples if layout == "compact" else 0
        header = {"format": "aerie-hidden-states", "version": VERSION if tail_samples else 1, "layout": layout,
                  "hidden_size": hidden_size, "num_aux_layers": num_aux_layers, "aux_layer_ids": list(aux_layer_ids),
                  "vocab_size": vocab_size, "target_fingerprint": target_fingerprint,
                  "dataset_fingerprint": dataset_fingerprint,
                  "aux_dtype": "bfloat16" if layout == "full" else "float8_e4m3fn",
                  "topk": topk if layout == "compact" else 0, "teacher_vocab": teacher_vocab,
                  "tail_samples": tail_samples, "topk_index_dtype": "int16" if vocab_size < 32768 else "int32"}
        os.makedirs(path, exist_ok=True)
        manifest_path = os.path.join(path, MANIFEST)
        if os.path.exists(manifest_path):
            with open(manifest_path) as f:
                self.manifest = json.load(f)
            self.manifest.setdefault("tail_samples", 0)  # written by a version 1 writer
            changed = [k for k, v in header.items() if self.manifest.get(k) != v]
            if changed:
                raise ValueError(f"{manifest_path}: existing store differs in {changed}; use another path or delete it")
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
        """One sample: input_ids/loss_mask (L,), aux_hidden_states (L, num_aux*H), then last_hidden_state (L, H)
        for "full", or teacher_topk_logprobs/ids (L, k), teacher_tail_ids (L, tail_samples) and teacher_argmax (L,)
        for "compact"."""
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
                raise ValueError("compact layout needs teacher_topk_logprobs, teacher_topk_ids and teacher_argmax")
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
    teacher_topk_logprobs (float32), teacher_topk_ids, teacher_argmax, teacher_tail_ids (long; absent in version 1
    stores) (compact), plus "id".
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
                raise ValueError(f"{d}: hidden-state store version {m.get('version')} is not readable by this Aerie "
                                 f"(reads versions 1 to {VERSION}); dump it again")
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

    def _check_shard(self, file: str, entry: dict) -> None:
        if not os.path.isfile(file):
            raise ValueError(f"{file}: shard listed in the manifest is missing")
        size = os.path.getsize(file)
        if size != entry["bytes"]:
            raise ValueError(f"{file}: truncated or corrupt shard ({size} bytes, manifest says {entry['bytes']})")
        if self.verify == "sha256":
            h = hashlib.sha256()
            with open(file, "rb") as f:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
            if h.hexdigest() != entry["sha256"]:
                raise ValueError(f"{file}: corrupt shard (sha256 mismatch)")

    def __iter__(self) -> Iterator[Dict[str, Tensor]]:
        from safetensors import SafetensorError, safe_open

        global_index = 0
        for d, m in self.parts:
            for entry in m["shards"]:
                first = global_index
                global_index += entry["num_samples"]
                mine = [i for i in range(entry["num_samples"]) if (first + i) % self.world_size == self.rank]
                if not mine:
                    continue
                file = os.path.join(d, entry["file"])
                self._check_shard(file, entry)
                try:
                    with safe_open(file, framework="pt") as f:
                        offsets = f.get_tensor("offsets").tolist()
                        if len(offsets) != entry["num_samples"] + 1 or offsets[-1] != entry["num_tokens"]:
                            raise ValueError(f"{file}: corrupt shard (offsets disagree with the manifest)")
                        slices = {k: f.get_slice(k) for k in f.keys() if k != "offsets"}
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
        """Random access to global sample `index`; shards stay memory-mapped once opened (checked on first use)."""
        from safetensors import SafetensorError, safe_open

        d, m, entry, local = self._locate(index)
        file = os.path.join(d, entry["file"])
        try:
            if file not in self._open:
                self._check_shard(file, entry)
                handle = safe_open(file, framework="pt")
                offsets = handle.get_tensor("offsets").tolist()
                if len(offsets) != entry["num_samples"] + 1 or offsets[-1] != entry["num_tokens"]:
                    raise ValueError(f"{file}: corrupt shard (offsets disagree with the manifest)")
                self._open[file] = (handle, offsets)
            handle, offsets = self._open[file]
            a, b = offsets[local], offsets[local + 1]
            tensors = {k: handle.get_slice(k)[a:b] for k in handle.keys() if k != "offsets"}
        except SafetensorError as e:
            raise ValueError(f"{file}: corrupt shard ({e})") from e
        return self._sample(tensors, m["sample_ids"][entry["first_sample"] + local])

    def token_rows(self) -> Iterator[Tuple[Tensor, Tensor]]:
        """(input_ids, loss_mask) of every sample in store order, reading only those two tensors."""
        from safetensors import safe_open

        for d, m in self.parts:
            for entry in m["shards"]:
                file = os.path.join(d, entry["file"])
                self._check_shard(file, entry)
                with safe_open(file, framework="pt") as f:
                    offsets = f.get_tensor("offsets").tolist()
                    ids, mask = f.get_tensor("input_ids").long(), f.get_tensor("loss_mask").long()
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


def sample_tail(logprobs: Tensor, topk_index: Tensor, num_samples: int,
                generator: Optional[torch.Generator] = None) -> Tensor:
    """(T, V) log-probs, (T, k) top-k columns -> (T, num_samples) columns drawn from the mass outside the top-k.

    Systematic sampling along the vocabulary: column i is drawn num_samples * p_i / tail times in expectation
    (tail = mass outside the top-k), so the top-k probabilities plus tail / num_samples per drawn column are an
    unbiased estimate of the distribution.  Columns with p_i >= tail / num_samples are always drawn.
    """
    probs = logprobs.float().exp().scatter(-1, topk_index, 0.0)
    cdf = probs.cumsum(-1)
    u = torch.rand(probs.shape[0], 1, generator=generator, device=probs.device)
    points = (u + torch.arange(num_samples, device=probs.device)) / num_samples * cdf[:, -1:]
    return torch.searchsorted(cdf, points, right=True).clamp_max(probs.shape[-1] - 1)


def target_fingerprint(spec) -> str:
    data = asdict(spec) if is_dataclass(spec) else repr(spec)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dump_writer(spec, cfg: StoreConfig, draft_token_ids: Optional[Tensor], path: str,
                 dataset_fingerprint: str) -> Tuple[HiddenStateStoreWriter, Tensor]:
    """The store writer of a dump of `spec`'s target and the draft ids (default: the whole vocabulary)."""
    if draft_token_ids is None:
        draft_token_ids = torch.arange(spec.vocab_size)
    full_vocab = draft_token_ids.numel() == spec.vocab_size and bool(
        (draft_token_ids.cpu() == torch.arange(spec.vocab_size)).all())
    teacher_vocab = "full" if full_vocab else hashlib.sha256(
        draft_token_ids.cpu().long().numpy().tobytes()).hexdigest()[:16]
    writer = HiddenStateStoreWriter(path, cfg.layout, spec.hidden_size, len(spec.aux_layer_ids), spec.aux_layer_ids,
                                    spec.vocab_size, target_fingerprint(spec), cfg.topk, cfg.shard_bytes,
                                    dataset_fingerprint, teacher_vocab, cfg.tail_samples)
    return writer, draft_token_ids


def _add_batch(writer: HiddenStateStoreWriter, cfg: StoreConfig, rows: List[dict], indices: List[int], out,
               draft_token_ids: Tensor) -> None:
    """Writes the rows of one target output (TargetOutput fields, batch-first): tail samples are seeded by the
    sample's index, so a resumed or re-sharded dump (same device type) writes the same store."""
    for b, (row, index) in enumerate(zip(rows, indices)):
        n = len(row["input_ids"])
        extra = {}
        if cfg.layout == "full":
            extra["last_hidden_state"] = out.last_hidden_state[b, :n]
        else:
            logprobs = torch.log_softmax(out.teacher_logits[b, :n].float(), dim=-1)
            values, topk_index = logprobs.topk(min(cfg.topk, logprobs.shape[-1]), dim=-1)
            extra.update(teacher_topk_logprobs=values, teacher_topk_ids=draft_token_ids[topk_index],
                         teacher_argmax=out.teacher_argmax[b, :n])
            if cfg.tail_samples:
                generator = torch.Generator(device=logprobs.device).manual_seed(index)
                tail = sample_tail(logprobs, topk_index, cfg.tail_samples, generator)
                extra["teacher_tail_ids"] = draft_token_ids[tail]
        writer.add(torch.as_tensor(row["input_ids"])[:n], torch.as_tensor(row["loss_mask"])[:n],
                   out.aux_hidden_states[b, :n], sample_id=row.get("id"), **extra)


@torch.no_grad()
def run_dump(target, dataset, cfg: StoreConfig, draft_token_ids: Optional[Tensor] = None, rank: int = 0,
             world_size: int = 1, dataset_fingerprint: str = "") -> HiddenStateStoreWriter:
    """Runs `target` (TargetModel contract) over `dataset` (rows with input_ids, loss_mask, id) into a store.

    Rank r dumps samples r, r+w, ... into cfg.path/part-{r:05d} (cfg.path itself when world_size == 1) and resumes
    after the complete shards already there.  draft_token_ids (default: the whole target vocabulary) is the id
    set the compact layout's top-k log-probs are normalised over; stored ids are target ids.
    """
    from data.batching import collate

    path = cfg.path if world_size == 1 else os.path.join(cfg.path, f"part-{rank:05d}")
    writer, draft_token_ids = _dump_writer(target.spec, cfg, draft_token_ids, path, dataset_fingerprint)
    device = next(target.module.parameters()).device
    draft_token_ids = draft_token_ids.to(device)
    todo = list(range(rank, len(dataset), world_size))[writer.num_samples:]
    batch_rows: List[dict] = []
    batch_index: List[int] = []

    def run(rows: List[dict]) -> None:
        batch = {k: v.to(device) for k, v in collate(rows, packed=False, max_tokens=10 ** 9).items()}
        out = target.forward(batch, draft_token_ids, return_last_hidden=cfg.layout == "full")
        _add_batch(writer, cfg, rows, batch_index, out, draft_token_ids)

    for i in todo:
        row = dataset[i]
        width = max([len(r["input_ids"]) for r in batch_rows] + [len(row["input_ids"])])
        if batch_rows and width * (len(batch_rows) + 1) > cfg.batch_max_tokens:
            run(batch_rows)
            batch_rows, batch_index = [], []
        batch_rows.append(row)
        batch_index.append(i)
    if batch_rows:
        run(batch_rows)
    writer.close()
    return writer


@torch.no_grad()
def dump_from_hidden_states(spec, teacher, samples: Iterator[Tuple[int, dict, Tensor]], cfg: StoreConfig,
                            draft_token_ids: Optional[Tensor] = None,
                            dataset_fingerprint: str = "") -> HiddenStateStoreWriter:
    """A store from hidden states computed elsewhere (vLLM's extraction): `samples` yields (index, row, hidden)
    with hidden (L, num_aux + 1, H) = the aux layers' states then the last layer's output before the final norm;
    `teacher` (models.targets.teacher.TeacherHead) makes the teacher logits from the latter.  The same store as
    run_dump writes from the target's forward."""
    from models.targets.base import TargetOutput

    writer, draft_token_ids = _dump_writer(spec, cfg, draft_token_ids, cfg.path, dataset_fingerprint)
    for index, row, hidden in samples:
        if index < writer.num_samples:
            continue  # in a complete shard of an earlier, interrupted dump
        last = hidden[:, -1][None].float()
        logits, argmax = teacher.teacher_from_hidden(last.to(teacher.lm_head.weight.dtype), draft_token_ids)
        out = TargetOutput(aux_hidden_states=hidden[:, :-1].reshape(1, hidden.shape[0], -1), teacher_logits=logits,
                           teacher_argmax=argmax, last_hidden_state=last)
        _add_batch(writer, cfg, [row], [index], out, draft_token_ids)
    writer.close()
    return writer
