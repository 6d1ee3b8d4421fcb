"""ModalityAdapter: raw sample -> token ids + loss mask (+ media tensors), batching, and target inputs.

An adapter turns one raw record into ``{"id", "input_ids", "loss_mask", ...media}`` (``encode``), lays
encoded samples out in the contract batch layout (``collate``: ``data.batching.collate`` plus the media
tensors), and, for multimodal targets, gives the extra keyword inputs the target's multimodal base model
needs (``model_inputs``) so the target returns the merged ``inputs_embeds``.

Records are either chat conversations (``record_kind = "conversation"``: validated by ``data.sources`` like
text data, plus the adapter's ``media_path_keys``) or free-form rows the adapter validates itself
(``"raw"``).  Templating settings (max_length, system prompt, template kwargs, mask method) are the data
config's; the adapter's own config holds only what is specific to its modality.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from torch import Tensor


@dataclass
class ModalityConfig:
    """Settings of one adapter (subclassed per modality)."""


class ModalityAdapter:
    is_multimodal = False
    config_class = ModalityConfig
    record_kind = "conversation"  # conversation | raw
    media_path_keys: Tuple[str, ...] = ()  # record keys holding file paths (resolved against the data file's
                                           # dir)
    pad_token_id = 0
    # Whether the draft reads the target's merged media embeddings at the placeholders (else the placeholder
    # tokens' own embeddings).  vLLM 0.32's Eagle3 proposer turns multimodal inputs off for drafts without
    # SupportsMultiModalEmbeddings (Eagle3LlamaForCausalLM, llm_base_proposer.load_model), so its draft embeds
    # the placeholder ids; training gives the draft the same.
    draft_reads_media_embeddings = False

    def __init__(self, cfg: Optional[ModalityConfig] = None, tokenizer=None, processor=None, data=None):
        """data: the DataConfig whose templating settings apply (default: DataConfig())."""
        from data.sources import DataConfig

        self.cfg = cfg if cfg is not None else self.config_class()
        self.data = data if data is not None else DataConfig()
        self.tokenizer = tokenizer
        self.processor = processor

    def encode(self, sample: dict) -> dict:
        raise NotImplementedError

    def draft_vocab_candidates(self) -> Optional[Tensor]:
        """Target ids the draft vocabulary may hold (None = any id)."""
        return None

    @property
    def fingerprint(self) -> str:
        """What the tokenised output depends on besides the data and the tokenizer."""
        config = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "name"}
        processor = getattr(self.processor, "to_dict", None)
        return json.dumps([type(self).__qualname__, config, processor() if processor else None],
                          sort_keys=True, default=str)

    @classmethod
    def model_inputs(cls, target, batch: dict) -> dict:
        """Extra kwargs (media tensors, position ids) for the multimodal base model
        ``target.module.model``."""
        raise NotImplementedError(f"{cls.__name__} is not multimodal")

    def collate_media(self, encoded: List[dict]) -> Dict[str, Tensor]:
        """Media tensors of the samples, concatenated in batch order (row-major, document order)."""
        return {}

    def collate(self, encoded: List[dict], packed: bool = False, max_tokens: Optional[int] = None) -> dict:
        """Encoded samples -> batch tensors (``data.batching.collate``) plus the samples' media tensors.

        packed: all samples in one row.  Media placeholders cannot be cut, so a multimodal sample that does
        not fit ``max_tokens`` is an error rather than truncated."""
        from data.batching import collate

        lengths = [len(s["input_ids"]) for s in encoded]
        budget = max_tokens if max_tokens is not None else (sum(lengths) if packed else max(lengths))
        if self.is_multimodal:
            room = ([budget - sum(lengths[:i]) for i in range(len(lengths))] if packed
                    else [budget] * len(lengths))
            for sample, n, free in zip(encoded, lengths, room):
                if n > free:
                    raise ValueError(f"sample {sample.get('id')!r} has {n} tokens but only {free} fit the "
                                     f"batch (max_tokens={budget}); media tokens cannot be truncated: raise "
                                     "trainer.max_tokens_per_batch or lower data.max_length")
        batch = collate(encoded, packed=packed, max_tokens=budget, pad_token_id=self.pad_token_id)
        batch.update(self.collate_media(encoded))
        return batch


def tokenize(adapter: ModalityAdapter, messages: List[dict]) -> Dict[str, List[int]]:
    from data.template import tokenize_conversation

    data = adapter.data
    return tokenize_conversation(adapter.tokenizer, messages, data.max_length, data.system_prompt,
                                 data.chat_template_kwargs, data.mask_method)


def sample_id(sample: dict) -> str:
    return str(sample.get("id", "<no id>"))
