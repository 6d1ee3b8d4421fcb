"""Text adapter: a chat conversation -> token ids and an assistant-only loss mask."""
from __future__ import annotations

from data.modality.base import ModalityAdapter, ModalityConfig, sample_id, tokenize
from data.registry import MODALITIES


@MODALITIES.register("text")
class TextAdapter(ModalityAdapter):
    config_class = ModalityConfig

    def encode(self, sample: dict) -> dict:
        if not isinstance(sample.get("messages"), list):
            raise ValueError(f"sample {sample_id(sample)}: 'messages' must be a list of {{role, content}}")
        tokens = tokenize(self, sample["messages"])
        return {"id": sample_id(sample), "input_ids": list(tokens["input_ids"]),
                "loss_mask": list(tokens["loss_mask"])}
