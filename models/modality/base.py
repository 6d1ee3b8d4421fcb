"""ModalityAdapter: raw sample -> token ids + loss mask (+ media tensors), batching, and target inputs.

An adapter turns one raw sample into ``{"id", "input_ids", "loss_mask", ...media}`` (``encode``), lays
encoded samples out in the contract batch layout (``collate``: padded rows, or packed rows with
``document_ids``), and, for multimodal targets, gives the extra keyword inputs the target's
multimodal base model needs (``model_inputs``) so the target returns the merged ``inputs_embeds``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
from torch import Tensor


@dataclass
class ModalityConfig:
    max_length: int = 2048
    system_prompt: Optional[str] = None
    chat_template_kwargs: Optional[dict] = None


class ModalityAdapter:
    is_multimodal = False
    config_class = ModalityConfig
    pad_token_id = 0

    def __init__(self, cfg: Optional[ModalityConfig] = None, tokenizer=None, processor=None):
        self.cfg = cfg if cfg is not None else self.config_class()
        self.tokenizer = tokenizer
        self.processor = processor

    def encode(self, sample: dict) -> dict:
        raise NotImplementedError

    def draft_vocab_candidates(self) -> Optional[Tensor]:
        """Target ids the draft vocabulary may hold (None = any id)."""
        return None

    @classmethod
    def model_inputs(cls, target, batch: dict) -> dict:
        """Extra kwargs (media tensors, position ids) for the multimodal base model ``target.module.model``."""
        raise NotImplementedError(f"{cls.__name__} is not multimodal")

    def collate_media(self, encoded: List[dict]) -> Dict[str, Tensor]:
        """Media tensors of the samples, concatenated in batch order (row-major, document order)."""
        return {}

    def collate(self, encoded: List[dict], packed: bool = False, max_tokens: Optional[int] = None) -> dict:
        """Encoded samples -> batch tensors (contract layout; padding on the right, document_ids -1).

        packed: fill rows of at most ``max_tokens`` tokens with whole samples, in order."""
        rows: List[List[dict]] = []
        for sample in encoded:
            n = len(sample["input_ids"])
            if packed:
                if max_tokens is None:
                    raise ValueError("collate(packed=True) needs max_tokens")
                if n > max_tokens:
                    raise ValueError(f"sample {sample.get('id')!r} has {n} tokens > max_tokens {max_tokens}")
                if rows and sum(len(s["input_ids"]) for s in rows[-1]) + n <= max_tokens:
                    rows[-1].append(sample)
                    continue
            rows.append([sample])
        length = max(sum(len(s["input_ids"]) for s in row) for row in rows)
        shape = (len(rows), length)
        batch = {"input_ids": torch.full(shape, self.pad_token_id, dtype=torch.long),
                 "loss_mask": torch.zeros(shape, dtype=torch.long),
                 "position_ids": torch.zeros(shape, dtype=torch.long),
                 "document_ids": torch.full(shape, -1, dtype=torch.long)}
        for r, row in enumerate(rows):
            start = 0
            for d, sample in enumerate(row):
                n = len(sample["input_ids"])
                batch["input_ids"][r, start:start + n] = torch.as_tensor(sample["input_ids"])
                batch["loss_mask"][r, start:start + n] = torch.as_tensor(sample["loss_mask"])
                batch["position_ids"][r, start:start + n] = torch.arange(n)
                batch["document_ids"][r, start:start + n] = d
                start += n
        batch.update(self.collate_media([s for row in rows for s in row]))
        return batch


def tokenize(adapter: ModalityAdapter, messages: List[dict]) -> Dict[str, List[int]]:
    from data.template import tokenize_conversation  # written by the data owner; imported lazily

    return tokenize_conversation(adapter.tokenizer, messages, adapter.cfg.max_length, adapter.cfg.system_prompt,
                                 adapter.cfg.chat_template_kwargs)


def sample_id(sample: dict) -> str:
    return str(sample.get("id", "<no id>"))
