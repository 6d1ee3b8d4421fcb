"""Thin `aerie` subcommands over the data pipeline: inspect, vocab, regen, serve.

Each takes the composed Hydra config and calls one function of `data/`; composition only, no logic.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def _tokenizer(cfg):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(cfg.target.path, trust_remote_code=cfg.target.trust_remote_code)


def run_inspect_command(cfg) -> None:
    from data.inspect import run_inspect

    run_inspect(OmegaConf.to_object(cfg.data), _tokenizer(cfg))


def run_vocab_command(cfg) -> None:
    """Count loss-masked tokens of the train split and write <run_dir>/vocab.safetensors (+ .json)."""
    from data.dataset import build_tokenized_datasets, dataset_fingerprint
    from trainer.data import _main_first, draft_vocab
    from trainer.distributed import init_distributed

    dist = init_distributed()
    tokenizer = _tokenizer(cfg)
    train, _ = _main_first(dist, lambda: build_tokenized_datasets(cfg.data, tokenizer))
    vocab = draft_vocab(train, cfg, dataset_fingerprint(cfg.data, tokenizer), len(tokenizer))
    if dist.is_main:
        print(f"draft vocab of {vocab['d2t'].numel()} tokens written to {Path(cfg.run_dir) / 'vocab.safetensors'}")


def run_regen_command(cfg) -> None:
    from data.regen import run_regen

    counts = run_regen(OmegaConf.to_object(cfg.regen), OmegaConf.to_object(cfg.data))
    print(" ".join(f"{k}={v}" for k, v in counts.items()))


def run_serve_command(cfg) -> None:
    from data.serve import serve

    serve(OmegaConf.to_object(cfg.serve))
