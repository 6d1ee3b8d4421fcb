"""The objective protocol: what the trainer calls on a draft and a teacher batch, and how it reads the result.

An objective is one class registered in OBJECTIVES plus one YAML under conf/objective/ (its
`config_class` is that YAML's schema).  The trainer never names a loss or a metric: it backpropagates
`ObjectiveOutput.loss`, sums
`ObjectiveOutput.sums` over micro-batches and ranks, and logs what `Objective.summarise` makes of the totals.

    @OBJECTIVES.register("my_objective")
    class MyObjective(Objective):
        config_class = MyObjectiveConfig          # a dataclass subclassing ObjectiveConfig
        def __call__(self, draft, inputs, noise_seed=None): ...   # -> ObjectiveOutput
        def summarise(self, sums): ...                             # -> {metric name: float}
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor


@dataclass
class ObjectiveConfig:
    """Knobs every objective has; subclasses add their own (conf/objective/<name>.yaml overrides them)."""
    noise: str = "uniform"  # uniform | gaussian: noise added to the aux hidden states in training
    noise_std: float = 0.0  # scale relative to each aux state's RMS (per token and layer); 0: off


@dataclass
class TeacherInputs:
    """One micro-batch as the objective sees it: token ids, the target's aux states and its teacher signal."""
    input_ids: Tensor  # (B, L)
    aux_hidden_states: Tensor  # (B, L, num_aux * H_target)
    teacher_logits: Tensor  # (B, L, Vd) over the draft vocabulary
    teacher_argmax: Tensor  # (B, L) target ids of the full-vocabulary argmax
    loss_mask: Tensor  # (B, L)
    position_ids: Tensor  # (B, L) or (3, B, L) for M-RoPE
    document_ids: Tensor  # (B, L), -1 on padding
    inputs_embeds: Optional[Tensor] = None  # (B, L, H) merged multimodal embeddings, else None


@dataclass
class ObjectiveOutput:
    loss: Tensor  # scalar to backpropagate
    sums: Dict[str, Tensor]  # detached tensors, summed over micro-batches and ranks before `summarise`


class Objective:
    config_class = ObjectiveConfig

    def __init__(self, cfg: ObjectiveConfig, draft_cfg):
        if cfg.noise not in ("uniform", "gaussian"):
            raise ValueError(f"objective.noise must be uniform or gaussian, got {cfg.noise!r}")
        if cfg.noise_std < 0:
            raise ValueError(f"objective.noise_std must be >= 0, got {cfg.noise_std}")
        self.cfg, self.draft_cfg = cfg, draft_cfg

    def __call__(self, draft, inputs: TeacherInputs, noise_seed: Optional[int] = None) -> ObjectiveOutput:
        raise NotImplementedError

    def summarise(self, sums: Dict[str, Tensor]) -> Dict[str, float]:
        raise NotImplementedError

    def noisy(self, aux_hidden_states: Tensor, num_aux: int, noise_seed: Optional[int]) -> Tensor:
        """aux + noise_std * rms * eps per token and aux layer (eps uniform in [-1, 1] or standard normal).

        Drawn from a generator seeded with `noise_seed` (None: no noise): a resumed run sees the same."""
        if noise_seed is None or self.cfg.noise_std == 0:
            return aux_hidden_states
        generator = torch.Generator(device=aux_hidden_states.device).manual_seed(int(noise_seed))
        layers = aux_hidden_states.float().unflatten(-1, (num_aux, -1))
        if self.cfg.noise == "gaussian":
            eps = torch.randn(layers.shape, generator=generator, device=layers.device)
        else:
            eps = 2 * torch.rand(layers.shape, generator=generator, device=layers.device) - 1
        rms = layers.pow(2).mean(-1, keepdim=True).sqrt()
        return (layers + self.cfg.noise_std * rms * eps).flatten(-2).to(aux_hidden_states.dtype)


def chain_tau(accept_per_step) -> float:
    """1 + sum_i prod_{j<=i} a_j: mean accepted length of chain drafting with per-step acceptance a."""
    tau, run = 1.0, 1.0
    for a in accept_per_step:
        run *= float(a)
        tau += run
    return tau


def build_objective(objective_cfg, draft_cfg) -> Objective:
    """The registered objective named by `objective_cfg.name`, configured (a DictConfig or its dataclass)."""
    from omegaconf import DictConfig, OmegaConf

    from models.registry import OBJECTIVES

    cls = OBJECTIVES.get(objective_cfg.name)
    if isinstance(objective_cfg, DictConfig):
        objective_cfg = OmegaConf.to_object(objective_cfg)
    return cls(objective_cfg, draft_cfg)
