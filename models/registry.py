"""String-keyed registries for the pluggable parts of Aerie.

Target backends, draft architectures, training objectives and their losses are looked up by name from Hydra
configs (modality adapters: data/registry.py; export formats: tools/export/base.py).  Built-ins are imported
lazily the first time they are asked for, so importing Aerie stays cheap.

    @DRAFTS.register("my_draft")
    class MyDraft(nn.Module): ...

    DRAFTS.get("my_draft")
"""
from __future__ import annotations

from data.registry import MODALITIES, Registry  # noqa: F401  (MODALITIES: one import for every registry)

TARGETS = Registry("target backend", {"hf": "models.targets.hf"})
DRAFTS = Registry("draft architecture",
                  {"eagle3_llama": "models.draft.eagle3", "dflash": "models.draft.dflash"})
OBJECTIVES = Registry("training objective",
                      {"ttt": "models.objectives.ttt", "dflash": "models.objectives.dflash"})
LOSSES = Registry("objective loss",
                  {name: "models.objectives.losses" for name in ("soft_ce", "lk", "lk_hybrid")})
