"""`aerie dump`: run the frozen target over the tokenised data once and write the offline hidden-state store.

Ranks split the samples (rank r writes <store>/<split>/part-r); under ZeRO-3 each rank holds a slice of the
target and DeepSpeed gathers layers in forward.  Interrupted dumps resume after their last complete shard.
`engine=vllm`: vLLM runs the target instead (its hidden-state extraction, tools/vllm/dump_worker.py, one
process) and Aerie applies only the final norm and lm_head (read from the checkpoint) for the teacher: the
same store.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Iterator, List, Tuple

import torch
from omegaconf import OmegaConf
from torch import Tensor

from data.store.format import StoreConfig, sample_tail
from data.store.writer import HiddenStateStoreWriter
from models.targets.base import TargetOutput


def target_fingerprint(spec) -> str:
    data = asdict(spec) if is_dataclass(spec) else repr(spec)
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _dump_writer(spec, cfg: StoreConfig, path: str, dataset_fingerprint: str
                 ) -> Tuple[HiddenStateStoreWriter, Tensor]:
    """The store writer of a dump of `spec`'s target, and the ids its teacher is stored over (every id)."""
    writer = HiddenStateStoreWriter(path, cfg.layout, spec.hidden_size, len(spec.aux_layer_ids),
                                    spec.aux_layer_ids, spec.vocab_size, target_fingerprint(spec), cfg.topk,
                                    cfg.shard_bytes, dataset_fingerprint, cfg.tail_samples)
    return writer, torch.arange(spec.vocab_size)


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
def run_dump(target, dataset, cfg: StoreConfig, rank: int = 0, world_size: int = 1,
             dataset_fingerprint: str = "") -> HiddenStateStoreWriter:
    """Runs `target` (TargetModel contract) over `dataset` (rows with input_ids, loss_mask, id) into a store.

    Rank r dumps samples r, r+w, ... into cfg.path/part-{r:05d} (cfg.path itself when world_size == 1) and
    resumes after the complete shards already there.  The compact layout's top-k log-probs are normalised
    over the whole target vocabulary (the draft vocabulary is chosen at training); stored ids are target ids.
    """
    from data.batching import collate

    path = cfg.path if world_size == 1 else os.path.join(cfg.path, f"part-{rank:05d}")
    writer, draft_token_ids = _dump_writer(target.spec, cfg, path, dataset_fingerprint)
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
                            dataset_fingerprint: str = "") -> HiddenStateStoreWriter:
    """A store from hidden states computed elsewhere (vLLM's extraction): `samples` yields (index, row,
    hidden) with hidden (L, num_aux + 1, H) = the aux layers' states then the last layer's output before the
    final norm; `teacher` (models.targets.teacher.TeacherHead) makes the teacher logits from the latter.  The
    same store as run_dump writes from the target's forward."""
    writer, draft_token_ids = _dump_writer(spec, cfg, cfg.path, dataset_fingerprint)
    for index, row, hidden in samples:
        if index < writer.num_samples:
            continue  # in a complete shard of an earlier, interrupted dump
        last = hidden[:, -1][None].float()
        logits, argmax = teacher.teacher_from_hidden(last.to(teacher.lm_head.weight.dtype), draft_token_ids)
        out = TargetOutput(aux_hidden_states=hidden[:, :-1].reshape(1, hidden.shape[0], -1),
                           teacher_logits=logits, teacher_argmax=argmax, last_hidden_state=last)
        _add_batch(writer, cfg, [row], [index], out, draft_token_ids)
    writer.close()
    return writer


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

    from models.targets.meta import target_spec_from_config
    from models.targets.teacher import load_lm_head_only
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
    from models.registry import TARGETS
    from trainer.distributed import barrier, init_distributed
    from trainer.engine import build_ds_config
    from trainer.inputs import _main_first, build_adapter
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
    tokenizer, processor = load_tokenizer_and_processor(cfg.target,
                                                        MODALITIES.get(cfg.modality.name).is_multimodal)
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
