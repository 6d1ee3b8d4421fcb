"""Look at tokenised data: a sample with its loss-masked (trained) tokens highlighted, and length statistics.

Highlighting uses ANSI colour on a terminal and ``[[...]]`` markers otherwise (or when colour=False).
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence, TextIO

import numpy as np

from data.sources import DataConfig

ANSI_TRAINED, ANSI_RESET = "\033[1;32m", "\033[0m"


def format_sample(tokenizer, input_ids: Sequence[int], loss_mask: Sequence[int],
                  colour: Optional[bool] = None) -> str:
    """Decoded text with each run of trained tokens wrapped in colour or [[...]]."""
    if colour is None:
        colour = sys.stdout.isatty()
    start, end = (ANSI_TRAINED, ANSI_RESET) if colour else ("[[", "]]")
    parts, run, run_mask = [], [], None
    for token, mask in zip(list(input_ids) + [None], list(loss_mask) + [None]):
        mask = None if mask is None else bool(mask)
        if run and mask != run_mask:
            text = tokenizer.decode(run)
            parts.append(f"{start}{text}{end}" if run_mask else text)
            run = []
        if token is not None:
            run.append(token)
            run_mask = mask
    return "".join(parts)


def dataset_stats(dataset) -> dict:
    """num_samples, num_tokens, num_masked_tokens, masked fraction and length percentiles of a tokenised
    dataset."""
    lengths = np.asarray(dataset["length"], dtype=np.int64)
    masked = np.asarray([sum(m) for m in dataset["loss_mask"]], dtype=np.int64)
    if lengths.size == 0:
        return {"num_samples": 0, "num_tokens": 0, "num_masked_tokens": 0}
    pct = {f"p{p}": int(np.percentile(lengths, p)) for p in (50, 90, 99)}
    return {"num_samples": int(lengths.size), "num_tokens": int(lengths.sum()),
            "num_masked_tokens": int(masked.sum()),
            "masked_fraction": round(float(masked.sum() / lengths.sum()), 4),
            "min_length": int(lengths.min()), **pct, "max_length": int(lengths.max())}


def run_inspect(cfg: DataConfig, tokenizer, num_samples: int = 1, colour: Optional[bool] = None,
                out: TextIO = sys.stdout, adapter=None) -> dict:
    """Prints the first `num_samples` train samples highlighted, then train/eval statistics; returns the
    stats."""
    from data.dataset import build_tokenized_datasets

    train, evals = build_tokenized_datasets(cfg, tokenizer, adapter)
    for i in range(min(num_samples, len(train))):
        row = train[i]
        print(f"--- sample {i} id={row['id']} length={row['length']} trained={sum(row['loss_mask'])}",
              file=out)
        print(format_sample(tokenizer, row["input_ids"], row["loss_mask"], colour), file=out)
    stats = {"train": dataset_stats(train), "eval": dataset_stats(evals)}
    for split, values in stats.items():
        print(f"{split}: " + ", ".join(f"{k}={v}" for k, v in values.items()), file=out)
    return stats
