"""Speech-token (TTS) adapter: text prompt -> speech-codec tokens emitted by a Llama/Qwen LM.

The CosyVoice/Orpheus pattern: ``text ids + [speech_start] + (speech_token_offset + codes) + [speech_end]``.
Loss covers the speech tokens and the end marker; the draft vocabulary is drawn from that range only.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from data.modality.base import ModalityAdapter, ModalityConfig, sample_id
from data.registry import MODALITIES


@dataclass
class SpeechTokensConfig(ModalityConfig):
    speech_token_offset: int = 0  # target id of codec token 0
    num_speech_tokens: int = 0  # codec codebook size
    speech_start_id: Optional[int] = None  # marks the switch from text to speech (not trained)
    speech_end_id: Optional[int] = None  # ends the speech (trained, and in the draft vocab)


@MODALITIES.register("speech_tokens")
class SpeechTokensAdapter(ModalityAdapter):
    config_class = SpeechTokensConfig
    record_kind = "raw"

    def __init__(self, cfg: Optional[SpeechTokensConfig] = None, tokenizer=None, processor=None, data=None):
        super().__init__(cfg, tokenizer, processor, data)
        if self.cfg.num_speech_tokens <= 0:
            raise ValueError("speech_tokens adapter needs num_speech_tokens > 0 (the codec codebook size)")

    def encode(self, sample: dict) -> dict:
        sid = sample_id(sample)
        cfg = self.cfg
        text, codes = sample.get("text"), sample.get("speech_tokens")
        if not isinstance(text, str) or not isinstance(codes, (list, tuple)) or not codes:
            raise ValueError(f"sample {sid}: needs 'text' (str) and a non-empty 'speech_tokens' list of "
                             "codec ids")
        bad = [c for c in codes if not 0 <= int(c) < cfg.num_speech_tokens]
        if bad:
            raise ValueError(f"sample {sid}: codec ids {bad[:5]} outside [0, {cfg.num_speech_tokens})")
        text_ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if cfg.speech_start_id is not None:
            text_ids.append(cfg.speech_start_id)
        speech_ids = [cfg.speech_token_offset + int(c) for c in codes]
        if cfg.speech_end_id is not None:
            speech_ids.append(cfg.speech_end_id)
        max_length = self.data.max_length
        input_ids = (text_ids + speech_ids)[:max_length]
        loss_mask = ([0] * len(text_ids) + [1] * len(speech_ids))[:max_length]
        return {"id": sid, "input_ids": input_ids, "loss_mask": loss_mask}

    def draft_vocab_candidates(self) -> Tensor:
        cfg = self.cfg
        ids = torch.arange(cfg.speech_token_offset, cfg.speech_token_offset + cfg.num_speech_tokens)
        if cfg.speech_end_id is not None:
            ids = torch.unique(torch.cat([ids, torch.tensor([cfg.speech_end_id])]))
        return ids
