"""DFlash block drafter, laid out the way vLLM serves it (`method: "dflash"`: qwen3_dflash.py and
v1/spec_decode/dflash.py).

One forward pass drafts a whole block.  With the target's positions 0..n-1 verified and x_n the token the
target just produced (the "bonus" token, not yet seen by the target):

    ctx_t   = hidden_norm(fc(cat(aux hidden states of the target at t)))     t = 0..n-1 (the context)
    K_ctx^l = rope(k_norm(k_proj^l(ctx_t)), t), V_ctx^l = v_proj^l(ctx_t)     per layer l, from the same ctx
    h       = embed([x_n, MASK, ..., MASK]) at positions n, n+1, ..., n+k    (mask_embedding at the MASKs)
    layer   = Qwen3 decoder layer (q_norm/k_norm, RoPE) whose queries attend, without a causal mask, to the
              context keys and to the keys of the whole block
    logits  = lm_head(norm(h)) at positions n+1..n+k                         -> draft tokens for x_{n+1..n+k}

The context is never run through the layers: it only gives keys and values.  The token embedding is the
target's (frozen); the mask token's embedding is trained (vLLM reads it from mask_embedding.pt).  Training
goes through models.draft.dflash_objective (registered as objective=dflash) (many blocks per sequence in one
pass); `new_context`/`extend_context`/`draft_block` is the inference API (context key/value cache) used by
evaluation and export checks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.draft.base import DraftModel
from models.draft.eagle3 import (
    DraftKVCache,
    Eagle3MLP,
    RMSNorm,
    RotaryEmbedding,
    _resolve,
    apply_rotary,
    layer_fields,
)
from models.registry import DRAFTS


@dataclass
class DFlashConfig:
    arch: str = "dflash"
    num_layers: int = 2
    hidden_size: Optional[int] = None  # None -> the target's (must equal it: the embedding is the target's)
    intermediate_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: Optional[float] = None
    draft_vocab_size: int = 32000  # clipped to the target vocab size
    # anchor + block_size - 1 drafted tokens: serve with num_speculative_tokens < block_size
    block_size: int = 8
    num_anchors: int = 64  # blocks trained per row of a micro-batch (sampled among the valid anchors)
    loss_decay: float = 7.0  # weight of block position j: exp(-(j - 1) / loss_decay); 0 -> equal weights
    mask_token_id: Optional[int] = None  # target id fed at the masked slots; None -> vocab_size - 1
    init_head: str = "target"  # target: norm + lm_head start from the target's (draft-vocab rows) | random
    gradient_checkpointing: bool = False


@dataclass
class DFlashModelConfig:
    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    vocab_size: int  # the target's
    draft_vocab_size: int
    target_hidden_size: int
    num_aux_layers: int
    num_layers: int
    block_size: int
    mask_token_id: int
    aux_layer_ids: List[int] = field(default_factory=list)  # vLLM convention (input of layer id)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DFlashModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"DFlashModelConfig: unknown keys {unknown}")
        return cls(**d)


class DFlashAttention(nn.Module):
    """Qwen3 attention: per-head RMSNorm on q and k before RoPE; keys/values also come from the context."""

    def __init__(self, config: DFlashModelConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        size = config.hidden_size
        self.q_proj = nn.Linear(size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, size, bias=False)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)

    def _heads(self, x: Tensor, num_heads: int) -> Tensor:
        return x.view(*x.shape[:2], num_heads, self.head_dim).transpose(1, 2)

    def key_value(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor]:
        """Rotated keys and values (B, kv_heads, T, d) of x (B, T, H)."""
        k = self.k_norm(self._heads(self.k_proj(x), self.num_kv_heads))
        return apply_rotary(k, cos, sin), self._heads(self.v_proj(x), self.num_kv_heads)

    def query(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        return apply_rotary(self.q_norm(self._heads(self.q_proj(x), self.num_heads)), cos, sin)

    def output(self, attended: Tensor) -> Tensor:
        batch, _, length, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class DFlashDecoderLayer(nn.Module):
    def __init__(self, config: DFlashModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = DFlashAttention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = Eagle3MLP(config)

    def forward(self, hidden: Tensor, context_kv: Tuple[Tensor, Tensor], cos: Tensor, sin: Tensor,
                visible: Optional[Tensor]) -> Tensor:
        """hidden (B, Q, H) block states; context_kv (B, kv_heads, C, d) each; visible (B, Q, C + Q) or None
        (every query sees every key)."""
        x = self.input_layernorm(hidden)
        attn = self.self_attn
        k, v = attn.key_value(x, cos, sin)
        keys, values = torch.cat([context_kv[0], k], 2), torch.cat([context_kv[1], v], 2)
        mask = None if visible is None else visible[:, None]
        attended = F.scaled_dot_product_attention(attn.query(x, cos, sin), keys, values, attn_mask=mask,
                                                  scale=attn.scale, enable_gqa=True)
        hidden = hidden + attn.output(attended)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


@DRAFTS.register("dflash")
class DFlashDraft(DraftModel):
    """DFlash draft.  Training: models.draft.dflash_objective.dflash_forward.  Inference:

        context = draft.new_context()
        draft.extend_context(aux[:, :n], positions[:, :n], context)  # target aux states of verified positions
        logits = draft.draft_block(bonus_ids, positions[:, n - 1] + 1, k,
                                   context)  # (B, k, Vd) for x_{n+1..n+k}
        # after verification: extend_context with the newly verified positions (or crop(n) to drop some)
    """

    config_class = DFlashConfig
    model_config_class = DFlashModelConfig
    architecture = "dflash"
    drafting = "block"

    def __init__(self, config: DFlashModelConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.embed_tokens.weight.requires_grad_(False)
        self.mask_embedding = nn.Parameter(torch.zeros(hidden))
        self.fc = nn.Linear(config.num_aux_layers * config.target_hidden_size, hidden, bias=False)
        self.hidden_norm = RMSNorm(hidden, config.rms_norm_eps)
        self.layers = nn.ModuleList(DFlashDecoderLayer(config) for _ in range(config.num_layers))
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.rotary_emb = RotaryEmbedding(config)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(config.vocab_size) < config.draft_vocab_size)
        self.gradient_checkpointing = False

    @classmethod
    def from_target(cls, draft_cfg: DFlashConfig, spec) -> "DFlashDraft":
        if draft_cfg.arch != "dflash":
            raise ValueError(f"draft.arch is {draft_cfg.arch!r}, DFlashDraft builds 'dflash'")
        if (spec.rope_scaling or {}).get("mrope_section"):
            raise ValueError("draft=dflash: vLLM's DFlash draft applies 1-D RoPE; "
                             "M-RoPE targets are not supported")
        if draft_cfg.num_layers < 1 or draft_cfg.block_size < 2 or draft_cfg.num_anchors < 1:
            raise ValueError("draft.num_layers >= 1, draft.block_size >= 2 and draft.num_anchors >= 1 "
                             "are required")
        if draft_cfg.loss_decay < 0:
            raise ValueError(f"draft.loss_decay must be >= 0, got {draft_cfg.loss_decay}")
        mask_token_id = _resolve(draft_cfg.mask_token_id, spec.vocab_size - 1)
        if not 0 <= mask_token_id < spec.vocab_size:
            raise ValueError(f"draft.mask_token_id={mask_token_id} is not a target id "
                             f"in [0, {spec.vocab_size})")
        config = DFlashModelConfig(
            **layer_fields(draft_cfg, spec),
            block_size=draft_cfg.block_size,
            mask_token_id=mask_token_id,
        )
        draft = cls(config)
        draft.gradient_checkpointing = draft_cfg.gradient_checkpointing
        return draft

    # ---- what every draft offers the trainer, export and eval ----------------------------------------------
    def load_embedding(self, weight: Tensor) -> None:
        """The target's (V, H) embedding; the mask embedding starts from the mask token's row."""
        super().load_embedding(weight)
        with torch.no_grad():
            self.mask_embedding.copy_(weight[self.config.mask_token_id])

    # ---- the served forward --------------------------------------------------------------------------------
    def embed_block(self, ids: Tensor, is_mask: Tensor) -> Tensor:
        """Embeddings of block ids (B, Q); the trained mask embedding where is_mask."""
        embeds = self.embed_tokens(ids).to(self.mask_embedding.dtype)
        return torch.where(is_mask[..., None], self.mask_embedding.expand_as(embeds), embeds)

    def context_states(self, aux_hidden_states: Tensor) -> Tensor:
        """hidden_norm(fc(aux)) (B, C, H): what every layer projects into its context keys and values."""
        return self.hidden_norm(self.fc(aux_hidden_states.to(self.fc.weight.dtype)))

    def context_kv(self, context: Tensor, positions: Tensor) -> List[Tuple[Tensor, Tensor]]:
        cos, sin = self.rotary_emb(positions, context.dtype)
        return [layer.self_attn.key_value(context, cos, sin) for layer in self.layers]

    def forward_blocks(self, context: Tensor, context_positions: Tensor, block_embeds: Tensor,
                       block_positions: Tensor, visible: Optional[Tensor]) -> Tensor:
        """Block states before the final norm (B, Q, H).

        context (B, C, H) from context_states; block_embeds (B, Q, H) at block_positions (B, Q); visible
        (B, Q, C + Q): which context and block keys each query sees (None: all)."""
        cos, sin = self.rotary_emb(block_positions, block_embeds.dtype)
        kvs = self.context_kv(context, context_positions)
        hidden = block_embeds
        for layer, kv in zip(self.layers, kvs):
            if self.gradient_checkpointing and torch.is_grad_enabled():
                hidden = checkpoint(layer, hidden, kv, cos, sin, visible, use_reentrant=False)
            else:
                hidden = layer(hidden, kv, cos, sin, visible)
        return hidden

    # ---- inference with a context cache --------------------------------------------------------------------
    def new_context(self) -> DraftKVCache:
        """Per-layer rotated context keys and values of the verified positions (crop(n) drops later ones)."""
        return DraftKVCache(len(self.layers))

    def extend_context(self, aux_hidden_states: Tensor, positions: Tensor, context: DraftKVCache) -> None:
        """Append verified positions (their aux states (B, T, A*Ht) and positions (B, T)) to the context."""
        for index, (k, v) in enumerate(self.context_kv(self.context_states(aux_hidden_states), positions)):
            context.append(index, k, v)

    def draft_block(self, bonus_ids: Tensor, bonus_positions: Tensor, num_tokens: int,
                    context: DraftKVCache) -> Tensor:
        """Draft-vocab logits (B, num_tokens, Vd) for the num_tokens tokens after the bonus ids (B,) at
        bonus_positions (B,); every row shares the context length."""
        if not 1 <= num_tokens < self.config.block_size:
            raise ValueError(f"num_tokens={num_tokens}: this DFlash draft was trained with block_size="
                             f"{self.config.block_size}, so it drafts 1..{self.config.block_size - 1} tokens")
        offsets = torch.arange(num_tokens + 1, device=bonus_ids.device)
        ids = torch.full((bonus_ids.shape[0], num_tokens + 1), self.config.mask_token_id,
                         device=bonus_ids.device)
        ids[:, 0] = bonus_ids
        embeds = self.embed_block(ids, offsets[None].expand_as(ids) > 0)
        positions = bonus_positions[:, None] + offsets
        cos, sin = self.rotary_emb(positions, embeds.dtype)
        hidden = embeds
        for index, layer in enumerate(self.layers):
            hidden = layer(hidden, (context.keys[index], context.values[index]), cos, sin, None)
        return self.compute_logits(hidden[:, 1:])
