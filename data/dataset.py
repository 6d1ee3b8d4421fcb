"""Tokenised train/eval datasets: sources -> chat template + loss mask -> `datasets.Dataset`, cached on disk.

The cache key covers the source (files' sizes and mtimes), the split/template settings and the tokenizer, so a
rerun with the same inputs memory-maps the cached Arrow files without reading the source again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any, Callable, List, Optional

from data.io import atomic_write_text
from data.sources import DataConfig, load_conversations, source_fingerprint, split_train_eval
from data.template import tokenize_conversation

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


def dataset_fingerprint(cfg: DataConfig, tokenizer, adapter: Any = None) -> str:
    """Identifies the tokenised data (source + settings + tokenizer); used for caches and vocab staleness."""
    parts = [source_fingerprint(cfg), tokenizer_fingerprint(tokenizer), cfg.max_length, cfg.system_prompt,
             cfg.chat_template_kwargs, cfg.mask_method, getattr(adapter, "fingerprint", None) or
             (type(adapter).__qualname__ if adapter is not None else None)]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _tokenize_batch(batch: dict, tokenizer, cfg: DataConfig, adapter: Optional[Callable]) -> dict:
    out = {c: [] for c in COLUMNS}
    for rid, messages_json in zip(batch["id"], batch["messages"]):
        messages = json.loads(messages_json)
        if adapter is not None:
            sample = adapter({"id": rid, "messages": messages})
        else:
            sample = tokenize_conversation(tokenizer, messages, cfg.max_length, cfg.system_prompt,
                                           cfg.chat_template_kwargs, cfg.mask_method)
        if not any(sample["loss_mask"]):
            continue  # nothing left to train on after truncation
        out["id"].append(rid)
        out["input_ids"].append(sample["input_ids"])
        out["loss_mask"].append(sample["loss_mask"])
        out["length"].append(len(sample["input_ids"]))
    return out


def _features():
    import datasets

    return datasets.Features({"id": datasets.Value("string"),
                              "input_ids": datasets.Sequence(datasets.Value("int32")),
                              "loss_mask": datasets.Sequence(datasets.Value("int8")),
                              "length": datasets.Value("int32")})


def _load_split(cache: str, name: str):
    import datasets

    if os.path.exists(os.path.join(cache, name, "empty")):  # datasets cannot reload a saved 0-row dataset
        return datasets.Dataset.from_dict({c: [] for c in COLUMNS}, features=_features())
    return datasets.load_from_disk(os.path.join(cache, name))


def tokenize_records(records: List[dict], tokenizer, cfg: DataConfig, adapter: Optional[Callable] = None):
    import datasets

    raw = datasets.Dataset.from_dict({"id": [r["id"] for r in records],
                                      "messages": [json.dumps(r["messages"]) for r in records]})
    num_proc = cfg.num_proc if cfg.num_proc > 1 and len(records) >= 2 * cfg.num_proc else None
    return raw.map(_tokenize_batch, batched=True, batch_size=64, num_proc=num_proc, remove_columns=raw.column_names,
                   features=_features(), fn_kwargs={"tokenizer": tokenizer, "cfg": cfg, "adapter": adapter},
                   desc="tokenising")


def build_tokenized_datasets(cfg: DataConfig, tokenizer, adapter: Optional[Callable] = None):
    """(train, eval) datasets with columns id, input_ids, loss_mask, length.

    `adapter`, when given, replaces the text template: adapter({"id", "messages"}) -> {"input_ids", "loss_mask"}.
    """
    fingerprint = dataset_fingerprint(cfg, tokenizer, adapter)
    cache = os.path.join(default_cache_dir(cfg), fingerprint)
    done = os.path.join(cache, "done.json")
    if os.path.exists(done):
        return _load_split(cache, "train"), _load_split(cache, "eval")
    records, report = load_conversations(cfg)
    print(report.summary())
    train_records, eval_records = split_train_eval(records, cfg)
    splits = []
    for name, split_records in (("train", train_records), ("eval", eval_records)):
        ds = tokenize_records(split_records, tokenizer, cfg, adapter)
        tmp = os.path.join(cache, f"{name}.tmp{os.getpid()}")
        ds.save_to_disk(tmp)
        if len(ds) == 0:
            open(os.path.join(tmp, "empty"), "w").close()
        shutil.rmtree(os.path.join(cache, name), ignore_errors=True)
        os.replace(tmp, os.path.join(cache, name))
        splits.append(_load_split(cache, name))
    train, evals = splits
    dropped = len(train_records) + len(eval_records) - len(train) - len(evals)
    if dropped:
        print(f"  dropped {dropped} conversations with no assistant token within max_length={cfg.max_length}")
    meta = {"fingerprint": fingerprint, "num_train": len(train), "num_eval": len(evals),
            "skipped": dict(report.counts), "notes": report.notes, "dropped_no_assistant_tokens": dropped}
    atomic_write_text(done, json.dumps(meta, indent=1))
    return train, evals

