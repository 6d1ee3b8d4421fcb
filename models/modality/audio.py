"""Audio (ASR) adapter for Qwen2-Audio targets: a waveform + its transcript, loss on the transcript.

The user turn is ``<|audio_bos|>`` + ``<|AUDIO|>`` x (encoder frames) + ``<|audio_eos|>`` + prompt; the
assistant turn is the transcript. The target merges the audio tower's features into the placeholders
and returns those merged embeddings for the draft.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List

import numpy as np
import torch
from torch import Tensor

from models.modality.base import ModalityAdapter, ModalityConfig, sample_id, tokenize
from models.registry import MODALITIES


@dataclass
class AudioConfig(ModalityConfig):
    prompt: str = "Transcribe the audio."
    audio_token: str = "<|AUDIO|>"
    audio_start_token: str = "<|audio_bos|>"
    audio_end_token: str = "<|audio_eos|>"


def read_waveform(path: str, sampling_rate: int, sid: str) -> np.ndarray:
    """Mono float32 waveform at ``sampling_rate`` (linear resampling when the file differs)."""
    import soundfile

    try:
        audio, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"sample {sid}: cannot read audio {path!r}: {err}") from err
    audio = audio.mean(axis=1)
    if file_rate != sampling_rate and len(audio) > 1:
        num_out = int(round(len(audio) * sampling_rate / file_rate))
        audio = np.interp(np.linspace(0, len(audio) - 1, num_out), np.arange(len(audio)), audio).astype(np.float32)
    return audio


def num_encoder_frames(num_mel_frames: int) -> int:
    """Audio-tower output length: a stride-2 conv then a stride-2 pooling over the mel frames."""
    after_conv = (num_mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


@MODALITIES.register("audio")
class AudioAdapter(ModalityAdapter):
    is_multimodal = True
    config_class = AudioConfig
    record_kind = "raw"
    media_path_keys = ("audio",)

    def _feature_extractor(self):
        if self.processor is None:
            raise ValueError("the audio adapter needs the target's processor (a feature extractor)")
        return getattr(self.processor, "feature_extractor", self.processor)

    def encode(self, sample: dict) -> dict:
        sid = sample_id(sample)
        cfg = self.cfg
        for key in ("audio", "transcript"):
            if not sample.get(key):
                raise ValueError(f"sample {sid}: missing {key!r}")
        extractor = self._feature_extractor()
        waveform = read_waveform(sample["audio"], extractor.sampling_rate, sid)
        features = extractor(waveform, sampling_rate=extractor.sampling_rate, return_attention_mask=True,
                             padding="max_length", return_tensors="pt")
        num_frames = num_encoder_frames(int(features["attention_mask"].sum()))
        user = (cfg.audio_start_token + cfg.audio_token * num_frames + cfg.audio_end_token
                + str(sample.get("prompt", cfg.prompt)))
        tokens = tokenize(self, [{"role": "user", "content": user},
                                 {"role": "assistant", "content": str(sample["transcript"])}])
        input_ids, loss_mask = list(tokens["input_ids"]), list(tokens["loss_mask"])
        audio_token_id = self.tokenizer.convert_tokens_to_ids(cfg.audio_token)
        if sum(1 for t in input_ids if t == audio_token_id) != num_frames:
            raise ValueError(f"sample {sid}: audio placeholders cut by data.max_length={self.data.max_length}")
        return {"id": sid, "input_ids": input_ids, "loss_mask": loss_mask,
                "input_features": features["input_features"], "feature_attention_mask": features["attention_mask"]}

    def collate_media(self, encoded: List[dict]) -> Dict[str, Tensor]:
        with_audio = [s for s in encoded if "input_features" in s]
        if not with_audio:
            return {}
        return {"input_features": torch.cat([s["input_features"] for s in with_audio]),
                "feature_attention_mask": torch.cat([s["feature_attention_mask"] for s in with_audio])}

    @classmethod
    def model_inputs(cls, target, batch: dict) -> dict:
        inputs = {"position_ids": batch["position_ids"]}
        if "input_features" in batch:
            inputs["input_features"] = batch["input_features"].to(target.dtype)
            inputs["feature_attention_mask"] = batch["feature_attention_mask"]
        return inputs
