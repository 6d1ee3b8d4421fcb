"""Thin `aerie` subcommands: train (the Trainer with its in-loop speculative eval), inspect, vocab, regen.

Each takes the composed Hydra config and calls into `trainer/` or `data/`; composition only, no logic.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf


def _adapter(cfg):
    """The modality adapter over the target's tokenizer (and processor), without loading the target's
    weights."""
    from models.registry import MODALITIES
    from models.targets.hf import load_tokenizer_and_processor
    from trainer.inputs import build_adapter

    tokenizer, processor = load_tokenizer_and_processor(cfg.target,
                                                        MODALITIES.get(cfg.modality.name).is_multimodal)
    return build_adapter(cfg, tokenizer, processor)


def run_train_command(cfg) -> None:
    """Train a draft; speculative decoding every trainer.spec_eval_every steps comes from
    tools/eval/in_loop.py."""
    from tools.eval.in_loop import speculative_eval
    from trainer.train import Trainer

    trainer = Trainer(cfg, spec_eval=speculative_eval)
    out = trainer.fit()
    if trainer.dist.is_main:
        print(f"draft written to {out}" if out.name == "final" else f"run state in {out}", flush=True)


def run_inspect_command(cfg) -> None:
    from data.inspect import run_inspect

    adapter = _adapter(cfg)
    run_inspect(OmegaConf.to_object(cfg.data), adapter.tokenizer, adapter=adapter)


def run_vocab_command(cfg) -> None:
    """Count loss-masked tokens of the train split and write <run_dir>/vocab.safetensors (+ .json)."""
    from data.dataset import build_tokenized_datasets, dataset_fingerprint
    from trainer.distributed import init_distributed
    from trainer.inputs import _main_first, draft_vocab

    dist = init_distributed()
    adapter = _adapter(cfg)
    tokenizer, data_cfg = adapter.tokenizer, adapter.data
    train, _ = _main_first(dist, lambda: build_tokenized_datasets(data_cfg, tokenizer, adapter))
    vocab = draft_vocab(train, cfg, dataset_fingerprint(data_cfg, tokenizer, adapter), len(tokenizer),
                        adapter.draft_vocab_candidates())
    if dist.is_main:
        print(f"draft vocab of {vocab['d2t'].numel()} tokens written to "
              f"{Path(cfg.run_dir) / 'vocab.safetensors'}")


def run_regen_command(cfg) -> None:
    """Regenerate the answers; exit 1 when the run wrote nothing or less than regen.min_done_share of it."""
    from data.regen import done_share_error, run_regen

    counts = run_regen(OmegaConf.to_object(cfg.regen), OmegaConf.to_object(cfg.data))
    print(" ".join(f"{k}={v}" for k, v in counts.items()), flush=True)
    error = done_share_error(counts, cfg.regen.min_done_share)
    if error:
        raise SystemExit(error)
