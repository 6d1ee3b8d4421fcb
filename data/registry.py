"""String-keyed registries: the `Registry` class, and the modality adapters (which live in data/modality/).

Built-ins are imported lazily the first time they are asked for, so importing Aerie stays cheap.
models/registry.py holds the other registries (targets, drafts, objectives, losses, export formats).

    @MODALITIES.register("my_modality")
    class MyAdapter(ModalityAdapter): ...
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
                raise ValueError(f"{self.kind} {name!r} is a built-in name (defined in {owner}); "
                                 "pick another name")
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
