"""`aerie eval` for multimodal targets: speculative decoding on prompts with images or audio.

A JSONL row is what the modality adapter reads (vision: ``{"id", "messages", "images": [paths]}``; audio:
``{"id", "audio": path, "prompt"?}``); a trailing assistant turn is dropped (a reference answer). Relative
media paths resolve against the JSONL's directory. The prompt goes through the adapter exactly as in training
(placeholders, processor features), the target's prefill merges the media, and chain drafting then runs
as for text (``tools.eval.decode.SpeculativeDecoder``) with what vLLM's chain-draft proposer gives the draft:
the aux states of the multimodal forward, the token embeddings of the ids (placeholders included), and the
target's M-RoPE positions (3D over the prompt, then text positions shifted by the prompt's rope delta).
Same metrics and reports as text.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any, List, Optional, Sequence

import torch
from torch import Tensor, nn

from data.io import read_jsonl
from tools.eval.decode import DecodeResult, EvalConfig, SpeculativeDecoder, evaluate_draft


def load_media_prompts(path: str, adapter, max_prompts: int = 0) -> List[dict]:
    """Encoded prompts (adapter.encode_prompt) of a JSONL; a bad row is a ValueError naming file:line."""
    jsonl = Path(path)
    if not jsonl.is_file():
        raise ValueError(f"eval.prompts={path!r}: "
                         f"a multimodal target needs a JSONL file of prompts with media")
    rows = read_jsonl(jsonl)[:max_prompts] if max_prompts and max_prompts > 0 else read_jsonl(jsonl)
    prompts = []
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise ValueError(f"{jsonl}:{number}: a row must be a JSON object")
        row = {"id": f"line {number}", **row}
        for key in adapter.media_path_keys:
            value = row.get(key)
            if isinstance(value, str):
                row[key] = str(jsonl.parent / value)
            elif isinstance(value, list):
                row[key] = [str(jsonl.parent / v) for v in value]
        try:
            prompts.append(adapter.encode_prompt(row))
        except ValueError as err:
            raise ValueError(f"{jsonl}:{number}: {err}") from None
    if not prompts:
        raise ValueError(f"{jsonl}: no prompts")
    return prompts


class MediaSpeculativeDecoder(SpeculativeDecoder):
    """SpeculativeDecoder whose prefill carries the prompt's media and whose positions are the target's."""

    def __init__(self, target: nn.Module, draft, adapter):
        super().__init__(target, draft)
        self.adapter = adapter
        self._prefill: Optional[dict] = None  # model inputs of the next prefill (media, positions)
        self._positions: Optional[Tensor] = None  # (3, 1, L) M-RoPE positions of the prompt, or None
        self._delta = 0  # text positions after the prompt: sequence index + delta

    def _seq_positions(self, index: Tensor) -> Tensor:
        """Sequence indices (1, n) -> the target's positions: (3, 1, n) under M-RoPE, else (1, n)."""
        if self._positions is None:
            return index
        length = self._positions.shape[-1]
        text = (index + self._delta).expand(3, -1, -1)
        inside = index.clamp(max=length - 1).expand(3, -1, -1)
        return torch.where(index < length, self._positions.gather(2, inside), text)

    def _target_forward(self, ids: List[int], cache):
        past = cache.get_seq_length()
        input_ids = torch.tensor([ids], device=self.device)
        if self._prefill is not None:
            inputs, self._prefill = self._prefill, None
        else:
            inputs = {"position_ids":
                      self._seq_positions(torch.arange(past, past + len(ids), device=self.device)[None])}
        out = self.target(input_ids=input_ids, use_cache=True, **{self.cache_kwarg: cache}, **inputs)
        return out.logits[0].float(), self._capture.pop()[0]

    def _draft_call(self, result: DecodeResult, fn, hidden, ids, positions, cache, **kwargs):
        return super()._draft_call(result, fn, hidden, ids, self._seq_positions(positions), cache, **kwargs)

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens: int, num_speculative_tokens: int, temperature: float = 0.0,
                 generator: Optional[torch.Generator] = None, eos_token_ids: Sequence[int] = (),
                 verify: str = "target_only") -> DecodeResult:
        """Speculative decoding of one encoded prompt (adapter.encode_prompt: input_ids + media tensors)."""
        batch = self.adapter.collate([prompt])
        batch = {k: v.to(self.device) for k, v in batch.items()}
        view = SimpleNamespace(module=self.target, dtype=next(self.target.parameters()).dtype)
        inputs = self.adapter.model_inputs(view, batch)
        positions = inputs["position_ids"]
        if positions.dim() == 3:
            self._positions = positions
            self._delta = int(positions.max()) + 1 - positions.shape[-1]
        else:
            self._positions, self._delta = None, 0
        self._prefill = inputs
        try:
            return super().generate(list(prompt["input_ids"]), max_new_tokens, num_speculative_tokens,
                                    temperature, generator, eos_token_ids, verify)
        finally:
            self._prefill, self._positions = None, None


def evaluate_media_draft(target: nn.Module, draft, adapter, cfg: EvalConfig) -> dict:
    """Acceptance of `draft` on cfg.prompts (a JSONL with media) for each k; reports as tools.eval.decode."""
    prompts = load_media_prompts(cfg.prompts, adapter, cfg.max_prompts)
    return evaluate_draft(target, draft, adapter.tokenizer, cfg, prompts=prompts,
                          decoder=MediaSpeculativeDecoder(target, draft, adapter))


def run_media_eval(cfg) -> dict:
    """`aerie eval` with a multimodal target (target.modality, modality=...): prints the JSON summary."""
    from omegaconf import OmegaConf

    from models.targets.hf import load_tokenizer_and_processor
    from tools.eval.decode import load_target_for_eval
    from trainer.checkpoint import load_draft
    from trainer.inputs import build_adapter

    ecfg = EvalConfig(**OmegaConf.to_container(cfg.eval, resolve=True))
    if not ecfg.draft or not cfg.target.path:
        raise ValueError("eval.draft and target.path are required")
    target, _ = load_target_for_eval(cfg.target)
    tokenizer, processor = load_tokenizer_and_processor(cfg.target, multimodal=True)
    adapter = build_adapter(cfg, tokenizer, processor)
    draft = load_draft(ecfg.draft, embed_weight=target.get_input_embeddings().weight.detach().float().cpu())
    summary = evaluate_media_draft(target, draft.to(next(target.parameters()).device), adapter, ecfg)
    print(json.dumps(summary, indent=2), flush=True)
    return summary


def is_media_eval(cfg: Any) -> bool:
    from models.registry import MODALITIES

    return MODALITIES.get(cfg.target.get("modality") or "text").is_multimodal
