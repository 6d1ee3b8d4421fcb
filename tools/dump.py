"""`aerie dump`: run the frozen target over the tokenised data once and write the offline hidden-state store.

Ranks split the samples (rank r writes <store>/<split>/part-r); under ZeRO-3 each rank holds a slice of the
target and DeepSpeed gathers layers in forward.  Interrupted dumps resume after their last complete shard.
`engine=vllm`: vLLM runs the target instead (its hidden-state extraction, tools/vllm/dump_worker.py, one process)
and Aerie applies only the final norm and lm_head (read from the checkpoint) for the teacher: the same store.
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


def dump_with_vllm(cfg, dataset, store_cfg, fingerprint: str, engine) -> None:
    """One split through vLLM's hidden-state extraction into the store at store_cfg.path (vLLM runs over the
    whole split; samples already in complete shards of an interrupted dump are kept, not rewritten)."""
    import shutil

    from safetensors.torch import load_file

    from data.store.reader import dump_from_hidden_states
    from models.targets.teacher import load_lm_head_only
    from tools.export.base import target_spec_from_config
    from tools.vllm.engine import run_vllm

    spec = target_spec_from_config(cfg.target)
    teacher = load_lm_head_only(OmegaConf.to_object(cfg.target))
    staging = Path(store_cfg.path).with_name(Path(store_cfg.path).name + ".vllm-states")
    shutil.rmtree(staging, ignore_errors=True)
    job = {"target": cfg.target.path, "layer_ids": list(spec.aux_layer_ids) + [spec.num_layers],
           "prompt_token_ids": [list(map(int, dataset[i]["input_ids"])) for i in range(len(dataset))],
           "out_dir": str(staging.resolve())}
    files = run_vllm(job, engine, worker=Path(__file__).parent / "vllm" / "dump_worker.py")["files"]
    samples = ((i, dataset[i], load_file(path)["hidden_states"]) for i, path in enumerate(files))
    dump_from_hidden_states(spec, teacher, samples, store_cfg, dataset_fingerprint=fingerprint)
    shutil.rmtree(staging, ignore_errors=True)


def run_dump_command(cfg) -> None:
    from tools.vllm.engine import engine_config

    engine = engine_config(cfg)
    if engine.name == "vllm":
        return run_vllm_dump_command(cfg, engine)
    from data.dataset import build_tokenized_datasets, dataset_fingerprint
    from data.store.reader import run_dump
    from models.registry import TARGETS
    from trainer.inputs import _main_first, build_adapter
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


def run_vllm_dump_command(cfg, engine) -> None:
    """`aerie dump engine=vllm`: one process, tokenised data, vLLM for the target's states (text targets)."""
    from data.dataset import build_tokenized_datasets, dataset_fingerprint
    from models.registry import MODALITIES
    from models.targets.hf import load_tokenizer_and_processor
    from trainer.inputs import build_adapter
    from trainer.logger import save_resolved_config

    build_adapter(cfg, encode=False, offline=True)  # fails fast on a multimodal target
    tokenizer, processor = load_tokenizer_and_processor(cfg.target, MODALITIES.get(cfg.modality.name).is_multimodal)
    adapter = build_adapter(cfg, tokenizer, processor)
    data_cfg = OmegaConf.to_object(cfg.data)
    splits = build_tokenized_datasets(data_cfg, tokenizer, adapter)
    fingerprint = dataset_fingerprint(data_cfg, tokenizer, adapter)
    root = Path(cfg.store.path)
    for name, dataset in zip(("train", "eval"), splits):
        if len(dataset):
            store_cfg = dataclasses.replace(OmegaConf.to_object(cfg.store), path=str(root / name))
            dump_with_vllm(cfg, dataset, store_cfg, fingerprint, engine)
    save_resolved_config(cfg, root)
    print(f"hidden-state store written to {root} ({cfg.store.layout} layout, states from vLLM)", flush=True)
