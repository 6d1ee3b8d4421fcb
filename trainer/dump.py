"""`aerie dump`: run the frozen target over the tokenised data once and write the offline hidden-state store.

Ranks split the samples (rank r writes <store>/<split>/part-r); under ZeRO-3 each rank holds a slice of the
target and DeepSpeed gathers layers in forward.  Interrupted dumps resume after their last complete shard.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import OmegaConf


def _inference_engine(target, ds_config: dict) -> None:
    """Wrap a ZeRO-3 partitioned target so DeepSpeed gathers its layers during forward."""
    import deepspeed

    config = {k: v for k, v in ds_config.items() if k not in ("optimizer", "gradient_clipping")}
    deepspeed.initialize(model=target.module, config=config)


def run_dump_command(cfg) -> None:
    from data.dataset import build_tokenized_datasets, dataset_fingerprint
    from data.store import run_dump
    from models.registry import TARGETS
    from trainer.data import _main_first, build_adapter
    from trainer.distributed import barrier, init_distributed
    from trainer.engine import build_ds_config
    from trainer.logger import save_resolved_config

    build_adapter(cfg, encode=False, offline=True)  # fails fast on a multimodal target, before loading it
    dist = init_distributed()
    ds_config = build_ds_config(cfg.deepspeed, cfg.trainer, dist.world_size)
    target = TARGETS.get(cfg.target.backend).load(cfg.target, ds_config)
    if cfg.deepspeed.zero_stage == 3:
        _inference_engine(target, ds_config)
    adapter = build_adapter(cfg, target.tokenizer, target.processor)
    data_cfg = OmegaConf.to_object(cfg.data)
    splits = _main_first(dist, lambda: build_tokenized_datasets(data_cfg, target.tokenizer, adapter))
    fingerprint = dataset_fingerprint(data_cfg, target.tokenizer, adapter)
    root = Path(cfg.store.path)
    for name, dataset in zip(("train", "eval"), splits):
        store_cfg = dataclasses.replace(OmegaConf.to_object(cfg.store), path=str(root / name))
        run_dump(target, dataset, store_cfg, rank=dist.rank, world_size=dist.world_size,
                 dataset_fingerprint=fingerprint)
    barrier()
    if dist.is_main:
        save_resolved_config(cfg, root)
        print(f"hidden-state store written to {root} ({cfg.store.layout} layout)", flush=True)
