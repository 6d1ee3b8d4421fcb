"""Vision adapter for Qwen2-VL / Qwen2.5-VL / Qwen3-VL targets: images -> placeholders + M-RoPE positions.

Each ``<image>`` marker in a message (or, without markers, the start of the first user turn) becomes
``<|vision_start|>`` + ``<|image_pad|>`` x (patches / merge^2) + ``<|vision_end|>``, as the Qwen processor
does. The target merges the vision tower's features into those placeholders (Qwen3-VL also adds its DeepStack
features to the first decoder layers' outputs there, so the aux states carry them, as in vLLM); the draft is
given the placeholder tokens' own embeddings, the aux states and the target's 3D (M-RoPE) positions, which is
what vLLM's Eagle3 proposer feeds the drafter when serving Qwen2.5-VL and Qwen3-VL.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Dict, List

import torch
from torch import Tensor

from data.modality.base import ModalityAdapter, ModalityConfig, sample_id, tokenize
from data.registry import MODALITIES


@dataclass
class VisionConfig(ModalityConfig):
    image_marker: str = "<image>"
    image_token: str = "<|image_pad|>"
    vision_start_token: str = "<|vision_start|>"
    vision_end_token: str = "<|vision_end|>"


def open_image(path: str, sid: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, ValueError) as err:
        raise ValueError(f"sample {sid}: cannot read image {path!r}: {err}") from err


@MODALITIES.register("vision")
class VisionAdapter(ModalityAdapter):
    is_multimodal = True
    config_class = VisionConfig
    media_path_keys = ("images",)

    def _image_processor(self):
        if self.processor is None:
            raise ValueError("the vision adapter needs the target's processor (an image processor)")
        return getattr(self.processor, "image_processor", self.processor)

    def encode(self, sample: dict) -> dict:
        sid = sample_id(sample)
        messages, media = self._messages_and_media(sample, sid)
        tokens = tokenize(self, messages)
        input_ids, loss_mask = list(tokens["input_ids"]), list(tokens["loss_mask"])
        self._check_placeholders(input_ids, media, sid)
        image_token_id = self.tokenizer.convert_tokens_to_ids(self.cfg.image_token)
        loss_mask = [0 if t == image_token_id else m for t, m in zip(input_ids, loss_mask)]
        return {"id": sid, "input_ids": input_ids, "loss_mask": loss_mask, **media}

    def encode_prompt(self, sample: dict) -> dict:
        """A generation prompt (the conversation up to its last user turn) + media, for speculative eval."""
        from data.template import render_prompt

        sid = sample_id(sample)
        messages, media = self._messages_and_media(sample, sid)
        while messages and messages[-1].get("role") == "assistant":  # a reference answer, not the prompt
            messages.pop()
        input_ids = render_prompt(self.tokenizer, messages)
        self._check_placeholders(input_ids, media, sid)
        return {"id": sid, "input_ids": input_ids, "loss_mask": [0] * len(input_ids), **media}

    def _messages_and_media(self, sample: dict, sid: str):
        """(messages with each image's placeholder block in place, {pixel_values, image_grid_thw} or {})."""
        paths = sample.get("images") or []
        if isinstance(paths, str):
            paths = [paths]
        messages = copy.deepcopy(sample.get("messages"))
        if not isinstance(messages, list):
            raise ValueError(f"sample {sid}: 'messages' must be a list of {{role, content}}")
        images = [open_image(p, sid) for p in paths]
        if not images:
            return messages, {}
        image_processor = self._image_processor()
        processed = image_processor(images=images, return_tensors="pt")
        grid = processed["image_grid_thw"]
        merge = image_processor.merge_size
        self._expand_markers(messages, (grid.prod(-1) // (merge * merge)).tolist(), sid)
        return messages, {"pixel_values": processed["pixel_values"], "image_grid_thw": grid}

    def _check_placeholders(self, input_ids: List[int], media: dict, sid: str) -> None:
        image_token_id = self.tokenizer.convert_tokens_to_ids(self.cfg.image_token)
        num_placeholders = sum(1 for t in input_ids if t == image_token_id)
        expected = 0
        if media:
            expected = int(media["image_grid_thw"].prod(-1).sum() // self._image_processor().merge_size ** 2)
        if num_placeholders != expected:
            raise ValueError(f"sample {sid}: {num_placeholders} image placeholder tokens after tokenization, "
                             f"expected {expected} (image cut by data.max_length={self.data.max_length}, or "
                             f"{self.cfg.image_token} written in the text?)")

    def _expand_markers(self, messages: List[dict], counts: List[int], sid: str) -> None:
        cfg = self.cfg
        blocks = [cfg.vision_start_token + cfg.image_token * n + cfg.vision_end_token for n in counts]
        num_markers = sum(str(m.get("content", "")).count(cfg.image_marker) for m in messages)
        if num_markers == 0:
            first_user = next((m for m in messages if m.get("role") == "user"), None)
            if first_user is None:
                raise ValueError(f"sample {sid}: images given but no user turn to attach them to")
            first_user["content"] = "".join(blocks) + str(first_user.get("content", ""))
            return
        if num_markers != len(blocks):
            raise ValueError(f"sample {sid}: {num_markers} {cfg.image_marker} markers but "
                             f"{len(blocks)} images")
        pending = iter(blocks)
        for message in messages:
            parts = str(message.get("content", "")).split(cfg.image_marker)
            message["content"] = parts[0] + "".join(next(pending) + part for part in parts[1:])

    def collate_media(self, encoded: List[dict]) -> Dict[str, Tensor]:
        with_images = [s for s in encoded if "pixel_values" in s]
        if not with_images:
            return {}
        return {"pixel_values": torch.cat([s["pixel_values"] for s in with_images]),
                "image_grid_thw": torch.cat([s["image_grid_thw"] for s in with_images])}

    @classmethod
    def model_inputs(cls, target, batch: dict) -> dict:
        inputs = {"position_ids": mrope_position_ids(target.module.model, batch)}
        if "pixel_values" in batch:
            inputs["pixel_values"] = batch["pixel_values"]
            inputs["image_grid_thw"] = batch["image_grid_thw"]
        return inputs


def mrope_position_ids(vl_model, batch: dict) -> Tensor:
    """(3, B, L) M-RoPE positions, computed per document (each restarts at 0); padding gets 0."""
    input_ids, document_ids = batch["input_ids"], batch["document_ids"]
    image_token_id = vl_model.config.image_token_id
    grids = batch.get("image_grid_thw")
    position_ids = torch.zeros(3, *input_ids.shape, dtype=torch.long, device=input_ids.device)
    next_image = 0
    for row in range(input_ids.shape[0]):
        for doc in range(int(document_ids[row].max().item()) + 1):
            where = document_ids[row] == doc
            ids = input_ids[row, where]
            is_image = ids == image_token_id
            num_images = int((is_image & ~torch.cat([is_image.new_zeros(1), is_image[:-1]])).sum())
            doc_grids = grids[next_image:next_image + num_images] if num_images else None
            next_image += num_images
            positions, _ = vl_model.get_rope_index(ids[None], mm_token_type_ids=is_image.int()[None],
                                                   image_grid_thw=doc_grids)
            position_ids[:, row, where] = positions[:, 0]
    return position_ids
