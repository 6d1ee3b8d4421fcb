"""The "dflash" objective: block drafting (models.draft.dflash_objective) for `draft=dflash`.

Anchors per row and the per-position loss decay stay with the draft config (`draft.num_anchors`,
`draft.loss_decay`), as the TTT unroll's depth does for Eagle3; noise augmentation is this config's.  Logged
per drafted block position j (as TTT logs per step): loss_j, acc_j, accept_j, and the chain τ estimates.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

from torch import Tensor

from models.draft.dflash_objective import dflash_forward
from models.objectives.base import Objective, ObjectiveConfig, ObjectiveOutput, TeacherInputs
from models.objectives.ttt import step_output, summarise_steps
from models.registry import OBJECTIVES


@dataclass
class DFlashObjectiveConfig(ObjectiveConfig):
    pass


@OBJECTIVES.register("dflash")
class DFlashObjective(Objective):
    config_class = DFlashObjectiveConfig

    def __init__(self, cfg: DFlashObjectiveConfig, draft_cfg):
        super().__init__(cfg, draft_cfg)
        arch = getattr(draft_cfg, "arch", None)
        if arch != "dflash":
            raise ValueError(f"objective=dflash trains block drafters; draft.arch is {arch!r} "
                             f"(use draft=dflash, or objective=ttt for Eagle3 drafts)")

    def __call__(self, draft, inputs: TeacherInputs, noise_seed: Optional[int] = None) -> ObjectiveOutput:
        if inputs.inputs_embeds is not None:
            raise ValueError("draft=dflash trains on text targets only (no merged media embeddings)")
        aux = self.noisy(inputs.aux_hidden_states.to(draft.fc.weight.dtype), draft.config.num_aux_layers,
                         noise_seed)
        out = dflash_forward(draft, inputs.input_ids, aux, inputs.teacher_logits, inputs.teacher_argmax,
                             inputs.loss_mask, inputs.position_ids, inputs.document_ids,
                             num_anchors=self.draft_cfg.num_anchors, loss_decay=self.draft_cfg.loss_decay)
        return step_output(out)

    def summarise(self, sums: Dict[str, Tensor]) -> Dict[str, float]:
        return summarise_steps(sums)
