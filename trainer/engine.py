"""The one place that turns configs into a DeepSpeed engine.

The engine holds a `TrainModule` (frozen target + trainable draft head, or the draft
alone offline); only the draft's parameters reach the optimizer.  Under ZeRO-3 the
target is partitioned across ranks and gathered layer by layer by DeepSpeed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable

import torch


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    offload_optimizer: bool = False     # optimizer state in CPU memory (DeepSpeedCPUAdam)
    offload_param: bool = False         # ZeRO-3 only: parameters in CPU memory
    overlap_comm: bool = True
    reduce_bucket_size: int = 50_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    extra: Dict[str, Any] = field(default_factory=dict)   # merged last into the generated ds_config


def resolve_precision(precision: str) -> str:
    if precision not in ("auto", "bf16", "fp32"):
        raise ValueError(f"trainer.precision must be auto, bf16 or fp32, got {precision!r}")
    if precision == "auto":
        return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    return precision


def _merge(base: Dict[str, Any], extra: Dict[str, Any]) -> Dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict)
                    else value)
    return out


def build_ds_config(ds: DeepSpeedConfig, trainer: Any, world_size: int) -> Dict[str, Any]:
    """A DeepSpeed config dict from the `deepspeed/` group and the trainer settings."""
    if ds.zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"deepspeed.zero_stage must be 0..3, got {ds.zero_stage}")
    if ds.offload_param and ds.zero_stage != 3:
        raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage=3")
    precision = resolve_precision(trainer.precision)
    zero: Dict[str, Any] = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm and torch.cuda.is_available(),
        "contiguous_gradients": True,
        "reduce_bucket_size": ds.reduce_bucket_size,
    }
    if ds.zero_stage == 3:
        zero.update(stage3_prefetch_bucket_size=ds.stage3_prefetch_bucket_size,
                    stage3_param_persistence_threshold=ds.stage3_param_persistence_threshold,
                    stage3_gather_16bit_weights_on_model_save=False)
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    betas = list(trainer.adam_betas)
    config: Dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,   # one token-budget micro-batch
        "gradient_accumulation_steps": trainer.grad_accum_steps,
        "train_batch_size": trainer.grad_accum_steps * world_size,
        "gradient_clipping": trainer.grad_clip,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "optimizer": {"type": "AdamW", "params": {
            "lr": trainer.lr, "betas": betas, "eps": 1e-8, "weight_decay": trainer.weight_decay,
            # no fused CUDA kernels on CPU hosts
            **({} if torch.cuda.is_available() or ds.offload_optimizer else {"torch_adam": True}),
        }},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10 ** 9,
        "wall_clock_breakdown": False,
    }
    return _merge(config, dict(ds.extra))


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """LR as a fraction of the peak after `step` optimizer steps: linear warm-up, then cosine or constant."""
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"trainer.schedule must be cosine or constant, got {schedule!r}")
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_engine(module: torch.nn.Module, trainable: Iterable[torch.nn.Parameter], ds_config: Dict[str, Any],
                 lr_lambda: Callable[[int], float]):
    """deepspeed.initialize over the train module; returns (engine, optimizer, scheduler)."""
    import deepspeed

    def scheduler(optimizer):
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)

    engine, optimizer, _, lr_scheduler = deepspeed.initialize(
        model=module, model_parameters=[p for p in trainable if p.requires_grad], config=ds_config,
        lr_scheduler=scheduler)
    return engine, optimizer, lr_scheduler
