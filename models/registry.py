"""String-keyed registries for the pluggable parts of Aerie.

Target backends, modality adapters, draft architectures, training objectives, their
losses and export formats are looked up by name from Hydra configs.  Built-ins are imported lazily the first
time they are asked for, so importing Aerie stays cheap.

    @DRAFTS.register("my_draft")
    class MyDraft(nn.Module): ...

    DRAFTS.get("my_draft")
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Dict


class Registry:
    def __init__(self, kind: str, builtins: Dict[str, str]):
        self.kind = kind
        self._builtins = dict(builtins)  # name -> module that registers it on import
        self._items: Dict[str, Any] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            owner = self._builtins.get(name)
            if owner is not None and getattr(obj, "__module__", None) != owner:
                raise ValueError(f"{self.kind} {name!r} is a built-in name (defined in {owner}); pick another name")
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is already registered (by {self._items[name]!r})")
            self._items[name] = obj
            return obj

        return decorator

    def get(self, name: str) -> Any:
        if name not in self._items and name in self._builtins:
            importlib.import_module(self._builtins[name])
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; available: {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list:
        return sorted(set(self._items) | set(self._builtins))

    def __contains__(self, name: str) -> bool:
        return name in self._items or name in self._builtins


TARGETS = Registry("target backend", {"hf": "models.targets.hf"})
MODALITIES = Registry(
    "modality adapter",
    {
        "text": "data.modality.text",
        "vision": "data.modality.vision",
        "audio": "data.modality.audio",
        "qwen3_asr": "data.modality.audio",
        "speech_tokens": "data.modality.speech_tokens",
    },
)
DRAFTS = Registry("draft architecture", {"eagle3_llama": "models.draft.eagle3", "dflash": "models.draft.dflash"})
EXPORTS = Registry(
    "export format",
    {"vllm": "tools.export.base", "sglang": "tools.export.base", "speculators": "tools.export.base"},
)
OBJECTIVES = Registry("training objective",
                      {"ttt": "models.objectives.ttt", "dflash": "models.objectives.dflash"})
LOSSES = Registry("objective loss",
                  {name: "models.objectives.losses" for name in ("soft_ce", "lk", "lk_hybrid")})
