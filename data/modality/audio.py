"""Audio (ASR) adapters: a waveform + its transcript, loss on the transcript.

``audio`` (Qwen2-Audio): the user turn is ``<|audio_bos|>`` + ``<|AUDIO|>`` x (encoder frames) +
``<|audio_eos|>`` + prompt; the assistant turn is the transcript. No engine registers an Eagle3 draft for
Qwen2-Audio, so it trains but does not export.
``qwen3_asr`` (Qwen3-ASR, which vLLM serves with Eagle3 drafts): ``<|audio_start|>`` + ``<|audio_pad|>`` x n +
``<|audio_end|>``, n from the encoder's chunked convolutions (as Qwen3ASRProcessor counts them).
The target merges the audio tower's features into the placeholders; the draft reads the aux states and the
placeholder tokens' own embeddings, as vLLM's Eagle3 proposer gives it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor

from data.modality.base import ModalityAdapter, ModalityConfig, sample_id, tokenize
from data.registry import MODALITIES


@dataclass
class AudioConfig(ModalityConfig):
    prompt: str = "Transcribe the audio."
    audio_token: str = "<|AUDIO|>"
    audio_start_token: str = "<|audio_bos|>"
    audio_end_token: str = "<|audio_eos|>"


@dataclass
class Qwen3ASRConfig(AudioConfig):
    audio_token: str = "<|audio_pad|>"
    audio_start_token: str = "<|audio_start|>"
    audio_end_token: str = "<|audio_end|>"


def read_waveform(path: str, sampling_rate: int, sid: str, declared_rate=None) -> np.ndarray:
    """Mono float32 waveform at ``sampling_rate`` (linear resampling when the file differs).

    declared_rate: the row's ``sampling_rate``, if it gives one; a file at another rate is an error."""
    import soundfile

    try:
        audio, file_rate = soundfile.read(path, dtype="float32", always_2d=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise ValueError(f"sample {sid}: cannot read audio {path!r}: {err}") from err
    if declared_rate is not None and int(declared_rate) != file_rate:
        raise ValueError(f"sample {sid}: audio {path!r} is sampled at {file_rate} Hz but the row says "
                         f"sampling_rate={declared_rate}")
    audio = audio.mean(axis=1)
    if file_rate != sampling_rate and len(audio) > 1:
        num_out = int(round(len(audio) * sampling_rate / file_rate))
        audio = np.interp(np.linspace(0, len(audio) - 1, num_out), np.arange(len(audio)),
                          audio).astype(np.float32)
    return audio


def num_encoder_frames(num_mel_frames: int) -> int:
    """Qwen2-Audio tower output length: a stride-2 conv then a stride-2 pooling over the mel frames."""
    after_conv = (num_mel_frames - 1) // 2 + 1
    return (after_conv - 2) // 2 + 1


def qwen3_asr_num_audio_tokens(num_mel_frames: int, n_window: int) -> int:
    """Qwen3-ASR tower output length: chunks of 2*n_window mel frames, three stride-2 convs each."""
    chunk = 2 * n_window
    remainder = num_mel_frames % chunk
    per_chunk = ((remainder - 1) // 2 + 1 - 1) // 2 + 1
    full_chunk = (((chunk - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1
    return (per_chunk - 1) // 2 + 1 + (num_mel_frames // chunk) * full_chunk


@MODALITIES.register("audio")
class AudioAdapter(ModalityAdapter):
    is_multimodal = True
    config_class = AudioConfig
    record_kind = "raw"
    media_path_keys = ("audio",)
    mask_key = "feature_attention_mask"  # the model's name for the mel-frame mask

    def _feature_extractor(self):
        if self.processor is None:
            raise ValueError("the audio adapter needs the target's processor (a feature extractor)")
        return getattr(self.processor, "feature_extractor", self.processor)

    def _features(self, waveform: np.ndarray) -> Tuple[Dict[str, Tensor], int]:
        """(media tensors, number of audio placeholder tokens) of one waveform."""
        extractor = self._feature_extractor()
        features = extractor(waveform, sampling_rate=extractor.sampling_rate, return_attention_mask=True,
                             padding="max_length", return_tensors="pt")
        num_tokens = num_encoder_frames(int(features["attention_mask"].sum()))
        return ({"input_features": features["input_features"], self.mask_key: features["attention_mask"]},
                num_tokens)

    def _turns(self, sample: dict, sid: str, with_transcript: bool):
        """(messages, media tensors, number of placeholders) of a row."""
        cfg = self.cfg
        for key in ("audio", "transcript") if with_transcript else ("audio",):
            if not sample.get(key):
                raise ValueError(f"sample {sid}: missing {key!r}")
        waveform = read_waveform(sample["audio"], self._feature_extractor().sampling_rate, sid,
                                 sample.get("sampling_rate"))
        media, num_tokens = self._features(waveform)
        user = (cfg.audio_start_token + cfg.audio_token * num_tokens + cfg.audio_end_token
                + str(sample.get("prompt", cfg.prompt)))
        messages = [{"role": "user", "content": user}]
        if with_transcript:
            messages.append({"role": "assistant", "content": str(sample["transcript"])})
        return messages, media, num_tokens

    def _check_placeholders(self, input_ids: List[int], num_tokens: int, sid: str) -> None:
        audio_token_id = self.tokenizer.convert_tokens_to_ids(self.cfg.audio_token)
        found = sum(1 for t in input_ids if t == audio_token_id)
        if found != num_tokens:
            raise ValueError(f"sample {sid}: {found} audio placeholders after tokenization, expected "
                             f"{num_tokens} (cut by data.max_length={self.data.max_length}?)")

    def encode(self, sample: dict) -> dict:
        sid = sample_id(sample)
        messages, media, num_tokens = self._turns(sample, sid, with_transcript=True)
        tokens = tokenize(self, messages)
        input_ids, loss_mask = list(tokens["input_ids"]), list(tokens["loss_mask"])
        self._check_placeholders(input_ids, num_tokens, sid)
        return {"id": sid, "input_ids": input_ids, "loss_mask": loss_mask, **media}

    def encode_prompt(self, sample: dict) -> dict:
        """The generation prompt (user turn with the audio) + media, for speculative eval."""
        from data.template import render_prompt

        sid = sample_id(sample)
        messages, media, num_tokens = self._turns(sample, sid, with_transcript=False)
        input_ids = render_prompt(self.tokenizer, messages)
        self._check_placeholders(input_ids, num_tokens, sid)
        return {"id": sid, "input_ids": input_ids, "loss_mask": [0] * len(input_ids), **media}

    def collate_media(self, encoded: List[dict]) -> Dict[str, Tensor]:
        """Features and masks of the samples, right-padded (mask 0) to the longest along the frame axis."""
        with_audio = [s for s in encoded if "input_features" in s]
        if not with_audio:
            return {}
        length = max(s["input_features"].shape[-1] for s in with_audio)

        def pad(t: Tensor) -> Tensor:
            return torch.nn.functional.pad(t, (0, length - t.shape[-1]))

        return {"input_features": torch.cat([pad(s["input_features"]) for s in with_audio]),
                self.mask_key: torch.cat([pad(s[self.mask_key]) for s in with_audio])}

    @classmethod
    def model_inputs(cls, target, batch: dict) -> dict:
        inputs = {"position_ids": batch["position_ids"]}
        if "input_features" in batch:
            inputs["input_features"] = batch["input_features"].to(target.dtype)
            inputs[cls.mask_key] = batch[cls.mask_key]
        return inputs


@MODALITIES.register("qwen3_asr")
class Qwen3ASRAdapter(AudioAdapter):
    """Qwen3-ASR (``Qwen3ASRForConditionalGeneration``): features padded to whole 2*n_window chunks."""

    config_class = Qwen3ASRConfig
    mask_key = "input_features_mask"

    def _features(self, waveform: np.ndarray) -> Tuple[Dict[str, Tensor], int]:
        extractor = self._feature_extractor()
        features = extractor(waveform, sampling_rate=extractor.sampling_rate, return_attention_mask=True,
                             padding=True, return_tensors="pt")
        num_tokens = qwen3_asr_num_audio_tokens(int(features["attention_mask"].sum()), extractor.n_window)
        return ({"input_features": features["input_features"], self.mask_key: features["attention_mask"]},
                num_tokens)
