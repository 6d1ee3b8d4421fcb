"""Teacher logits from the target's last hidden state, chunked over positions.

Full-vocabulary logits exist for one chunk of positions at a time (peak chunk x V, not B*L*V):
each chunk yields its argmax over the whole vocabulary and the columns of the draft vocabulary.
``load_lm_head_only`` builds the final norm + lm_head alone from the checkpoint's safetensors.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.targets.base import TargetConfig, resolve_dtype


def chunked_teacher_logits(last_hidden_state: Tensor, norm: nn.Module, lm_head_weight: Tensor,
                           lm_head_bias: Optional[Tensor], draft_token_ids: Tensor, chunk_size: int,
                           softcap: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """(..., H) raw last-layer output -> (teacher_logits (..., Vd) float32, teacher_argmax (...) long)."""
    if chunk_size <= 0:
        raise ValueError(f"logits_chunk_size must be positive, got {chunk_size}")
    lead_shape = last_hidden_state.shape[:-1]
    hidden = last_hidden_state.reshape(-1, last_hidden_state.shape[-1])
    draft_token_ids = draft_token_ids.to(hidden.device)
    num_positions = hidden.shape[0]
    teacher_logits = torch.empty(num_positions, draft_token_ids.numel(), dtype=torch.float32,
                                 device=hidden.device)
    teacher_argmax = torch.empty(num_positions, dtype=torch.long, device=hidden.device)
    for start in range(0, num_positions, chunk_size):
        end = min(start + chunk_size, num_positions)
        normed = norm(hidden[start:end]).to(lm_head_weight.dtype)
        logits = F.linear(normed, lm_head_weight, lm_head_bias).float()
        if softcap:
            logits = torch.tanh(logits / softcap) * softcap
        teacher_argmax[start:end] = logits.argmax(dim=-1)
        teacher_logits[start:end] = logits.index_select(1, draft_token_ids)
        del logits
    return teacher_logits.view(*lead_shape, -1), teacher_argmax.view(lead_shape)


def final_logit_softcap(config) -> Optional[float]:
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text_config, "final_logit_softcapping", None)


class TeacherHead(nn.Module):
    """Final norm + lm_head of a target, for training from stored hidden states."""

    def __init__(self, norm: nn.Module, lm_head: nn.Linear, logits_chunk_size: int,
                 softcap: Optional[float] = None):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.logits_chunk_size = logits_chunk_size
        self.softcap = softcap
        self.requires_grad_(False)
        self.eval()

    @torch.no_grad()
    def teacher_from_hidden(self, last_hidden_state: Tensor,
                            draft_token_ids: Tensor) -> Tuple[Tensor, Tensor]:
        return chunked_teacher_logits(last_hidden_state, self.norm, self.lm_head.weight, self.lm_head.bias,
                                      draft_token_ids, self.logits_chunk_size, self.softcap)


def load_lm_head_only(cfg: TargetConfig) -> TeacherHead:
    """Final norm + lm_head read from the safetensors files, without materialising the target."""
    from models.targets.meta import (
        checkpoint_key_files,
        decoder_of,
        load_config,
        meta_model,
        pick_key,
        read_tensor,
    )

    if not os.path.isdir(cfg.path):
        raise ValueError(f"load_lm_head_only needs a local checkpoint dir, got {cfg.path!r}")
    config = load_config(cfg)
    # only to learn the norm's class; nothing is allocated
    meta_norm = decoder_of(meta_model(config, cfg)).norm
    key_files = checkpoint_key_files(cfg.path)
    keys = list(key_files)
    tied = getattr(config.get_text_config(), "tie_word_embeddings",
                   getattr(config, "tie_word_embeddings", False))
    has_head = any(k == "lm_head.weight" or k.endswith(".lm_head.weight") for k in keys)
    head_key = pick_key(keys, "embed_tokens.weight" if tied or not has_head else "lm_head.weight", cfg.path)
    head_weight = read_tensor(head_key, key_files)
    bias_key = head_key[: -len("weight")] + "bias"
    head_bias = read_tensor(bias_key, key_files) if bias_key in key_files and "lm_head" in head_key else None
    norm_prefix = pick_key(keys, "norm.weight", cfg.path)[: -len("weight")]
    norm_state = {k[len(norm_prefix):]: read_tensor(k, key_files) for k in keys if k.startswith(norm_prefix)}

    dtype = resolve_dtype(cfg.dtype) or head_weight.dtype
    norm = meta_norm.to_empty(device="cpu")
    norm.load_state_dict(norm_state)
    lm_head = nn.Linear(head_weight.shape[1], head_weight.shape[0], bias=head_bias is not None, device="meta")
    lm_head = lm_head.to_empty(device="cpu")
    lm_head.load_state_dict({"weight": head_weight, **({"bias": head_bias} if head_bias is not None else {})})
    return TeacherHead(norm.to(dtype), lm_head.to(dtype), cfg.logits_chunk_size, final_logit_softcap(config))


def plain_head_weights(norm: nn.Module, lm_head: nn.Module, where: str) -> Tuple[Tensor, Tensor]:
    """(final norm weight (H,), lm_head weight (V, H)) detached, for a draft that starts from the target's
    readout (draft.init_head=target); ValueError unless they are a plain RMSNorm and a bias-free Linear."""
    if (set(dict(norm.named_parameters())) != {"weight"} or "gemma" in type(norm).__name__.lower()
            or getattr(lm_head, "bias", None) is not None):
        raise ValueError(f"draft.init_head=target: {where}'s final norm ({type(norm).__name__}) or lm_head "
                         "is not a plain RMSNorm + bias-free Linear; use draft.init_head=random")
    return norm.weight.detach(), lm_head.weight.detach()


def target_head_weights(cfg: TargetConfig, head: Optional[TeacherHead] = None) -> Tuple[Tensor, Tensor]:
    """plain_head_weights of `head` (the full-layout store's teacher head) or, without one, read from the
    checkpoint files alone (offline training), in target.dtype."""
    head = head if head is not None else load_lm_head_only(cfg)
    return plain_head_weights(head.norm, head.lm_head, cfg.path)
