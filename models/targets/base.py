"""The frozen-target interface: config, spec, per-batch output and the TargetModel ABC.

Auxiliary layer ids follow vLLM's convention: id ``i`` is the *input* to decoder layer ``i``,
i.e. ``hidden_states[i]`` of HF's ``output_hidden_states`` (index 0 is the embedding output).
SGLang names the same tensor "output of layer ``i - 1``"; convert with ``to_sglang_layer_ids``.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn


@dataclass
class TargetConfig:
    backend: str = "hf"
    path: str = ""  # local dir or hub id
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    aux_layer_ids: Optional[List[int]] = None  # vLLM convention; None -> [2, N//2, N-3]
    trust_remote_code: bool = False
    attn_implementation: str = "sdpa"  # sdpa | eager
    logits_chunk_size: int = 1024  # positions per chunk for teacher logits
    modality: str = "text"  # adapter name in MODALITIES; picks the model class for multimodal targets


@dataclass
class TargetSpec:
    name_or_path: str
    model_type: str
    architectures: List[str]
    num_layers: int
    hidden_size: int
    intermediate_size: int
    vocab_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    aux_layer_ids: List[int] = field(default_factory=list)  # resolved, vLLM convention


@dataclass
class TargetOutput:
    aux_hidden_states: Tensor  # (B, L, num_aux * H), target dtype
    teacher_logits: Tensor  # (B, L, Vd) float32, target logits at t restricted to the draft vocab
    teacher_argmax: Tensor  # (B, L) long, argmax of the full target logits at t (target-vocab id)
    last_hidden_state: Optional[Tensor] = None  # (B, L, H) raw output of the last layer (before final norm)
    inputs_embeds: Optional[Tensor] = None  # (B, L, H) merged token/media embeddings (multimodal only)
    position_ids: Optional[Tensor] = None  # (3, B, L) M-RoPE positions when the target uses them, else None


def default_aux_layer_ids(num_layers: int) -> List[int]:
    if num_layers < 4:
        raise ValueError(f"target has {num_layers} decoder layers; default aux layers need >= 4, "
                         "set aux_layer_ids")
    return [2, num_layers // 2, num_layers - 3]


def validate_aux_layer_ids(aux_layer_ids: List[int], num_layers: int) -> List[int]:
    """Allowed (vLLM convention): 1 <= id <= N-1, so that the SGLang id (id-1) is a real layer; repeats
    allowed."""
    ids = [int(i) for i in aux_layer_ids]
    if not ids:
        raise ValueError("aux_layer_ids is empty; give at least one layer id")
    bad = [i for i in ids if not 1 <= i <= num_layers - 1]
    if bad:
        raise ValueError(f"aux_layer_ids {bad} out of range: with {num_layers} layers ids must be in "
                         f"[1, {num_layers - 1}] "
                         "(vLLM convention: input to decoder layer id)")
    return ids


def resolve_aux_layer_ids(aux_layer_ids: Optional[List[int]], num_layers: int) -> List[int]:
    if aux_layer_ids is None:
        return default_aux_layer_ids(num_layers)
    return validate_aux_layer_ids(list(aux_layer_ids), num_layers)


def to_sglang_layer_ids(ids: List[int]) -> List[int]:
    """vLLM ids (input to layer id) -> SGLang ids (output of layer id)."""
    if any(int(i) < 1 for i in ids):
        raise ValueError(f"vLLM aux layer ids must be >= 1 to convert to SGLang, got {list(ids)}")
    return [int(i) - 1 for i in ids]


def from_sglang_layer_ids(ids: List[int]) -> List[int]:
    """SGLang ids (output of layer id) -> vLLM ids (input to layer id + 1)."""
    if any(int(i) < 0 for i in ids):
        raise ValueError(f"SGLang aux layer ids must be >= 0, got {list(ids)}")
    return [int(i) + 1 for i in ids]


# config name -> dtype
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_dtype(name: str) -> Optional[torch.dtype]:
    """'auto' -> None (use the checkpoint's dtype)."""
    table = {"auto": None, **DTYPES}
    if name not in table:
        raise ValueError(f"target dtype {name!r} not one of {sorted(table)}")
    return table[name]


class TargetModel(abc.ABC):
    """A frozen target that yields aux hidden states and teacher logits for a batch."""

    spec: TargetSpec
    tokenizer: object
    processor: object  # None for text
    module: nn.Module  # frozen HF model: requires_grad False everywhere, eval mode

    @classmethod
    @abc.abstractmethod
    def load(cls, cfg: TargetConfig, ds_config: Optional[dict] = None) -> "TargetModel":
        """ZeRO-3 partitioned load when ds_config has zero_optimization.stage == 3."""

    @abc.abstractmethod
    def forward(self, batch: dict, draft_token_ids: Tensor, return_last_hidden: bool = False) -> TargetOutput:
        """batch: input_ids/position_ids/document_ids (+ modality tensors); draft_token_ids (Vd,) target
        ids."""

    @abc.abstractmethod
    def teacher_from_hidden(self, last_hidden_state: Tensor,
                            draft_token_ids: Tensor) -> Tuple[Tensor, Tensor]:
        """Final norm + lm_head over chunks of positions -> (teacher_logits (.., Vd) f32,
        teacher_argmax (..))."""

    @abc.abstractmethod
    def embed_tokens_weight(self) -> Tensor:
        """The full (V, H) input embedding table (gathered if ZeRO-3 partitioned)."""

    @abc.abstractmethod
    def head_weights(self) -> Tuple[Tensor, Tensor]:
        """(final norm weight (H,), lm_head weight (V, H)), gathered if ZeRO-3 partitioned: the readout a
        draft starts from with draft.init_head=target."""

    def __call__(self, batch: dict, draft_token_ids: Tensor,
                 return_last_hidden: bool = False) -> TargetOutput:
        return self.forward(batch, draft_token_ids, return_last_hidden=return_last_hidden)
