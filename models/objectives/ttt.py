"""The "ttt" objective: the draft unrolled for draft.ttt_steps steps (models.draft.ttt) under one loss.

The unroll's depth and per-step decay stay with the draft config (`draft.ttt_steps`, `draft.step_decay`);
the loss, its knobs, the top-1 agreement term and noise augmentation are conf/objective/ttt.yaml's.

Logged per step i: loss_i, acc_i (argmax agreement with the target, counted in target ids) and accept_i (the
teacher-forced acceptance sum_v min(p_v, q_v)); tau_sim = 1 + sum_i prod_{j<=i} acc_j (greedy verification)
and tau_sim_sampled the same over accept_i (speculative sampling with the draft's own distribution).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
from torch import Tensor

from models.draft.ttt import TTTOutput, ttt_forward
from models.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, TeacherInputs, chain_tau
from models.registry import LOSSES, OBJECTIVES


@dataclass
class TTTObjectiveConfig(ObjectiveConfig):
    loss: str = "soft_ce"  # a LOSSES name: soft_ce | lk | lk_hybrid
    hybrid_eta: float = 3.0  # lk_hybrid: KL weight exp(-hybrid_eta * acceptance)
    top1_weight: float = 0.0  # + top1_weight * -log q(teacher argmax): greedy verification's acceptance


@OBJECTIVES.register("ttt")
class TTTObjective(Objective):
    config_class = TTTObjectiveConfig

    def __init__(self, cfg: TTTObjectiveConfig, draft_cfg):
        super().__init__(cfg, draft_cfg)
        LOSSES.get(cfg.loss)  # an unknown loss fails at start-up, listing the known ones
        if cfg.top1_weight < 0:
            raise ValueError(f"objective.top1_weight must be >= 0, got {cfg.top1_weight}")

    def __call__(self, draft, inputs: TeacherInputs, noise_seed: Optional[int] = None) -> ObjectiveOutput:
        aux = inputs.aux_hidden_states.to(draft.fc.weight.dtype)
        aux = self.noisy(aux, draft.config.num_aux_layers, noise_seed)
        out = ttt_forward(draft, inputs.input_ids, aux, inputs.teacher_logits, inputs.teacher_argmax,
                          inputs.loss_mask, inputs.position_ids, inputs.document_ids,
                          ttt_steps=self.draft_cfg.ttt_steps, step_decay=self.draft_cfg.step_decay,
                          inputs_embeds=inputs.inputs_embeds, loss=self.cfg.loss, loss_cfg=self.cfg,
                          top1_weight=self.cfg.top1_weight)
        return step_output(out)

    def summarise(self, sums: Dict[str, Tensor]) -> Dict[str, float]:
        return summarise_steps(sums)


def step_output(out: TTTOutput) -> ObjectiveOutput:
    """The trainer's view of a per-step output (TTT steps, or DFlash block positions)."""
    sums = {"loss": out.loss, "loss_per_step": out.loss_per_step, "correct": out.correct_per_step,
            "accept": out.accept_per_step, "count": out.count_per_step, "oov": out.num_out_of_vocab,
            "n": torch.tensor(1.0)}
    return ObjectiveOutput(loss=out.loss, sums={k: v.detach().float() for k, v in sums.items()})


def summarise_steps(sums: Dict[str, Tensor]) -> Dict[str, float]:
    """Mean losses over micro-batches; accuracy and acceptance over positions; both chain τ estimates."""
    n = float(sums["n"])
    count = sums["count"].clamp(min=1)
    acc, accept = (sums["correct"] / count).tolist(), (sums["accept"] / count).tolist()
    metrics = {"loss": float(sums["loss"]) / n}
    metrics.update({f"loss_{i}": v / n for i, v in enumerate(sums["loss_per_step"].tolist())})
    metrics.update({f"acc_{i}": v for i, v in enumerate(acc)})
    metrics.update({f"accept_{i}": v for i, v in enumerate(accept)})
    metrics["tau_sim"] = chain_tau(acc)
    metrics["tau_sim_sampled"] = chain_tau(accept)
    metrics["num_tokens"] = float(sums["count"][0])
    metrics["num_out_of_vocab"] = float(sums["oov"])
    return metrics
