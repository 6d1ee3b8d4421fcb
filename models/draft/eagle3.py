"""Eagle3 draft head with a Llama decoder layer, laid out the way vLLM and SGLang serve it.

    h      = fc(cat(aux hidden states of the target))             # first draft step only
    x      = cat(input_layernorm(embed(x_{t+1})), hidden_norm(h))  # 2H into q/k/v of the first layer
    r      = h + o_proj(attention(x))                              # hidden_norm(h) if norm_before_residual
    out    = r + mlp(post_attention_layernorm(r))
    logits = lm_head(norm(out))                                    # over the draft vocabulary

EAGLE 3.1 switches (vLLM llama_eagle3.py): `norm_before_fc` applies one RMSNorm (input_norm) to the
concatenated aux states before fc, `fc_norm` one RMSNorm per aux layer (fc_norm.i), and `norm_output` feeds
the next draft step norm(out) instead of out (logits are lm_head(norm(out)) either way).

Further layers (num_layers > 1) are plain Llama layers on H.  Rotary embeddings use the target's rope_theta
and rope_scaling.  The token embedding is the target's, frozen.  Training goes through models.draft.ttt;
`step` is the inference API (KV cache) used by evaluation and export checks.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.draft.base import DraftModel
from models.registry import DRAFTS


@dataclass
class DraftConfig:
    arch: str = "eagle3_llama"
    num_layers: int = 1
    hidden_size: Optional[int] = None  # None -> the target's
    intermediate_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    rms_norm_eps: Optional[float] = None
    draft_vocab_size: int = 32000  # clipped to the target vocab size
    ttt_steps: int = 7
    step_decay: float = 0.8
    norm_before_residual: bool = False
    norm_before_fc: bool = False  # EAGLE 3.1: RMSNorm over the concatenated aux states before fc
    fc_norm: bool = False  # EAGLE 3.1: one RMSNorm per aux layer before fc
    norm_output: bool = False  # EAGLE 3.1: the next draft step reads norm(out)
    gradient_checkpointing: bool = False
    attention: str = "lean"  # "lean" (memory-lean) | "dense" (reference; small L)
    init_head: str = "target"  # target: norm + lm_head start from the target's (draft-vocab rows) | random


@dataclass
class Eagle3ModelConfig:
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
    num_layers: int = 1
    norm_before_residual: bool = False
    aux_layer_ids: List[int] = field(default_factory=list)  # vLLM convention
    norm_before_fc: bool = False
    fc_norm: bool = False
    norm_output: bool = False

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Eagle3ModelConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Eagle3ModelConfig: unknown keys {unknown}")
        return cls(**d)


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(config: Eagle3ModelConfig) -> Tuple[Tensor, float]:
    """Inverse frequencies and cos/sin scaling from the target's rope_theta / rope_scaling."""
    scaling = dict(config.rope_scaling or {})
    rope_type = scaling.pop("rope_type", scaling.pop("type", "default"))
    # M-RoPE: default frequencies, split over (t, h, w) by RotaryEmbedding
    if rope_type in ("default", "mrope"):
        exponents = torch.arange(0, config.head_dim, 2, dtype=torch.int64).float() / config.head_dim
        return 1.0 / (config.rope_theta**exponents), 1.0
    if rope_type in ("dynamic", "longrope"):
        raise ValueError(f"rope_scaling type {rope_type!r} depends on the sequence length; "
                         "not supported by the draft")
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    if rope_type not in ROPE_INIT_FUNCTIONS:
        raise ValueError(f"unknown rope_scaling type {rope_type!r}; "
                         f"known: default, {', '.join(ROPE_INIT_FUNCTIONS)}")
    llama_config = LlamaConfig(
        hidden_size=config.hidden_size,
        num_attention_heads=config.num_attention_heads,
        head_dim=config.head_dim,
        max_position_embeddings=config.max_position_embeddings,
        rope_parameters={**scaling, "rope_type": rope_type, "rope_theta": config.rope_theta},
    )
    inv_freq, attention_scaling = ROPE_INIT_FUNCTIONS[rope_type](llama_config, None)
    return inv_freq.float(), float(attention_scaling)


def mrope_components(section: List[int], interleaved: bool) -> Tensor:
    """Which position component (0 = t, 1 = h, 2 = w) rotates each of the head_dim/2 frequencies.

    Chunked (Qwen2-VL / Qwen2.5-VL): [t]*s0 + [h]*s1 + [w]*s2.  Interleaved (Qwen3-VL, ``mrope_interleaved``):
    t h w t h w ... while each of h and w has frequencies left (j % 3 == 1 and j < 3*s1: h; j % 3 == 2 and
    j < 3*s2: w), t everywhere else, as HF's Qwen3VLTextRotaryEmbedding and vLLM's apply_interleaved_rope."""
    if not interleaved:
        return torch.repeat_interleave(torch.arange(len(section)), torch.tensor(section, dtype=torch.long))
    if len(section) != 3:
        raise ValueError(f"rope_scaling.mrope_interleaved needs a 3-part mrope_section (t, h, w), "
                         f"got {section}")
    j = torch.arange(sum(section))
    component = torch.zeros_like(j)
    component[(j % 3 == 1) & (j < 3 * section[1])] = 1
    component[(j % 3 == 2) & (j < 3 * section[2])] = 2
    return component


class RotaryEmbedding(nn.Module):
    """RoPE over (B, T) positions, or M-RoPE over (3, B, T) positions when rope_scaling has mrope_section.

    M-RoPE: frequency j rotates by the temporal, height or width position according to ``mrope_components``
    (chunked sections for Qwen2-VL / Qwen2.5-VL, interleaved for Qwen3-VL); with equal components (text) it
    is plain RoPE, so (B, T) positions also work."""

    def __init__(self, config: Eagle3ModelConfig):
        super().__init__()
        inv_freq, self.attention_scaling = rope_inv_freq(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        scaling = config.rope_scaling or {}
        section = [int(n) for n in scaling.get("mrope_section") or []]
        if section and sum(section) != inv_freq.numel():
            raise ValueError(f"rope_scaling.mrope_section {section} must sum to "
                             f"head_dim/2 = {inv_freq.numel()}")
        component = mrope_components(section, bool(scaling.get("mrope_interleaved")))
        self.register_buffer("mrope_component", component, persistent=False)

    def forward(self, position_ids: Tensor, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
        freqs = position_ids.float()[..., None] * self.inv_freq
        if position_ids.dim() == 3:  # (3, B, T) -> pick each frequency's component
            if self.mrope_component.numel() == 0:
                raise ValueError("3D (M-RoPE) position ids given to a draft whose rope_scaling "
                                 "has no mrope_section")
            index = self.mrope_component.expand(1, *freqs.shape[1:])
            freqs = freqs.gather(0, index).squeeze(0)
        angles = torch.cat([freqs, freqs], -1)  # (B, T, head_dim)
        return ((angles.cos() * self.attention_scaling).to(dtype),
                (angles.sin() * self.attention_scaling).to(dtype))


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, heads, T, head_dim); cos/sin (B, T, head_dim); HF Llama's rotate-half layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], -1)
    return x * cos[:, None] + rotated * sin[:, None]


class Eagle3Attention(nn.Module):
    def __init__(self, config: Eagle3ModelConfig, input_size: int):
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.q_proj = nn.Linear(input_size, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(input_size, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(input_size, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def project(self, x: Tensor, cos: Tensor, sin: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """q (B, heads, T, d), k and v (B, kv_heads, T, d), rotary applied to q and k."""
        batch, length, _ = x.shape
        q = self.q_proj(x).view(batch, length, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, length, self.num_kv_heads, self.head_dim).transpose(1, 2)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def output(self, attended: Tensor) -> Tensor:
        batch, _, length, _ = attended.shape
        return self.o_proj(attended.transpose(1, 2).reshape(batch, length, self.num_heads * self.head_dim))


class Eagle3MLP(nn.Module):
    def __init__(self, config: Eagle3ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Eagle3DecoderLayer(nn.Module):
    """The first layer reads cat(input_layernorm(embeds), hidden_norm(hidden)) (2H); later layers read H."""

    def __init__(self, config: Eagle3ModelConfig, is_first: bool):
        super().__init__()
        self.is_first = is_first
        self.norm_before_residual = config.norm_before_residual
        size = config.hidden_size
        self.input_layernorm = RMSNorm(size, config.rms_norm_eps)
        if is_first:
            self.hidden_norm = RMSNorm(size, config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config, 2 * size if is_first else size)
        self.post_attention_layernorm = RMSNorm(size, config.rms_norm_eps)
        self.mlp = Eagle3MLP(config)

    def attention_inputs(self, embeds: Optional[Tensor], hidden: Tensor, cos: Tensor, sin: Tensor):
        """(q, k, v, residual) for this layer; `embeds` is only read by the first layer."""
        if self.is_first:
            normed_hidden = self.hidden_norm(hidden)
            x = torch.cat([self.input_layernorm(embeds), normed_hidden], -1)
            residual = normed_hidden if self.norm_before_residual else hidden
        else:
            x, residual = self.input_layernorm(hidden), hidden
        q, k, v = self.self_attn.project(x, cos, sin)
        return q, k, v, residual

    def finish(self, attended: Tensor, residual: Tensor) -> Tensor:
        hidden = residual + self.self_attn.output(attended)
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class DraftKVCache:
    """Per-layer rotated keys and values (B, kv_heads, S, head_dim) of the positions the draft has seen."""

    def __init__(self, num_layers: int):
        self.keys: List[Optional[Tensor]] = [None] * num_layers
        self.values: List[Optional[Tensor]] = [None] * num_layers

    def __len__(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def append(self, layer: int, k: Tensor, v: Tensor) -> Tuple[Tensor, Tensor]:
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], 2), torch.cat([self.values[layer], v], 2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def crop(self, length: int) -> None:
        """Keep the first `length` entries (drop rejected draft tokens)."""
        for layer, k in enumerate(self.keys):
            if k is not None:
                self.keys[layer], self.values[layer] = k[:, :, :length], self.values[layer][:, :, :length]


def _resolve(value, default):
    return default if value is None else value


def attention_sizes(draft_cfg, spec) -> Tuple[int, int, int, int]:
    """(hidden, heads, kv_heads, head_dim) of a draft: its config's, the target's where None."""
    hidden = _resolve(draft_cfg.hidden_size, spec.hidden_size)
    if hidden != spec.hidden_size:
        raise ValueError(f"draft.hidden_size={hidden} differs from the target's {spec.hidden_size}; "
                         "the draft uses the target's token embedding")
    heads = _resolve(draft_cfg.num_attention_heads, spec.num_attention_heads)
    same_heads = heads == spec.num_attention_heads
    kv_heads = _resolve(draft_cfg.num_key_value_heads, spec.num_key_value_heads if same_heads else heads)
    if heads % kv_heads:
        raise ValueError(f"draft.num_attention_heads={heads} is not a multiple of "
                         f"num_key_value_heads={kv_heads}")
    return hidden, heads, kv_heads, _resolve(draft_cfg.head_dim,
                                             spec.head_dim if same_heads else hidden // heads)


def layer_fields(draft_cfg, spec) -> dict:
    """The decoder-layer, rotary and vocabulary fields every draft's model config shares, from the draft
    config (None: the target's) and the target spec."""
    hidden, heads, kv_heads, head_dim = attention_sizes(draft_cfg, spec)
    return dict(
        hidden_size=hidden,
        intermediate_size=_resolve(draft_cfg.intermediate_size, spec.intermediate_size),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=_resolve(draft_cfg.rms_norm_eps, spec.rms_norm_eps),
        rope_theta=float(spec.rope_theta),
        rope_scaling=dict(spec.rope_scaling) if spec.rope_scaling else None,
        max_position_embeddings=spec.max_position_embeddings,
        vocab_size=spec.vocab_size,
        draft_vocab_size=min(draft_cfg.draft_vocab_size, spec.vocab_size),
        target_hidden_size=spec.hidden_size,
        num_aux_layers=len(spec.aux_layer_ids),
        num_layers=draft_cfg.num_layers,
        aux_layer_ids=list(spec.aux_layer_ids),
    )


@DRAFTS.register("eagle3_llama")
class Eagle3LlamaDraft(DraftModel):
    """Eagle3 draft.  Training: models.draft.ttt.ttt_forward.  Inference with a KV cache (chain drafting):

        cache = draft.new_cache()
        # prefix: target aux states of positions 0..T-1 and the ids x_1..x_T (the token after each position)
        logits, hidden = draft.step(aux[:, :T], ids[:, 1:T + 1], pos[:, :T], cache)
        token = draft.to_target_ids(logits[:, -1].argmax(-1))     # drafts x_{T+1}
        hidden = hidden[:, -1:]
        for j in range(1, k):  # draft step j at rotary position pos[T-1] + j
            logits, hidden = draft.step(hidden, token[:, None], pos[:, T - 1:T] + j, cache)
            token = draft.to_target_ids(logits[:, -1].argmax(-1))
        cache.crop(T)                                              # forget the draft tokens
        # after verification, append the newly accepted target positions T..T+m-1 (aux states, next ids)
        logits, hidden = draft.extend(new_aux, new_next_ids, new_pos, cache)

    `step(hidden, ids_or_embeds, position_ids, cache)`: hidden is either the target's concatenated aux states
    (B, T, num_aux * target_hidden; fc is applied) or a previous out hidden (B, T, H); it is told apart by its
    last dimension (pass is_aux when both sizes are equal).  ids_or_embeds are the token ids (long, (B, T)) or
    token embeddings (B, T, H) of the token after each position.  The T new positions attend to everything in
    the cache and causally among themselves, and are appended to the cache (all rows share the cache length:
    batch only sequences of equal length).  Returns draft-vocab logits
    (B, T, Vd) and the input of the next draft step (B, T, H): the out hidden before the final norm, or after
    it with norm_output.
    """

    config_class = DraftConfig
    model_config_class = Eagle3ModelConfig
    architecture = "eagle3_llama"

    def __init__(self, config: Eagle3ModelConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.embed_tokens.weight.requires_grad_(False)
        aux_size = config.num_aux_layers * config.target_hidden_size
        if config.norm_before_fc:
            self.input_norm = RMSNorm(aux_size, config.rms_norm_eps)
        if config.fc_norm:
            self.fc_norm = nn.ModuleList(RMSNorm(config.target_hidden_size, config.rms_norm_eps)
                                         for _ in range(config.num_aux_layers))
        self.fc = nn.Linear(aux_size, hidden, bias=False)
        self.layers = nn.ModuleList(Eagle3DecoderLayer(config, is_first=i == 0)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(hidden, config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.draft_vocab_size, bias=False)
        self.rotary_emb = RotaryEmbedding(config)
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long))
        self.register_buffer("t2d", torch.arange(config.vocab_size) < config.draft_vocab_size)
        self.gradient_checkpointing = False
        self.attention = "lean"

    @classmethod
    def from_target(cls, draft_cfg: DraftConfig, spec) -> "Eagle3LlamaDraft":
        if draft_cfg.arch != "eagle3_llama":
            raise ValueError(f"draft.arch is {draft_cfg.arch!r}, Eagle3LlamaDraft builds 'eagle3_llama'")
        if draft_cfg.attention not in ("lean", "dense"):
            raise ValueError(f"draft.attention must be 'lean' or 'dense', got {draft_cfg.attention!r}")
        if draft_cfg.num_layers < 1 or draft_cfg.ttt_steps < 1:
            raise ValueError("draft.num_layers and draft.ttt_steps must be >= 1")
        config = Eagle3ModelConfig(
            **layer_fields(draft_cfg, spec),
            norm_before_residual=draft_cfg.norm_before_residual,
            norm_before_fc=draft_cfg.norm_before_fc,
            fc_norm=draft_cfg.fc_norm,
            norm_output=draft_cfg.norm_output,
        )
        draft = cls(config)
        draft.gradient_checkpointing = draft_cfg.gradient_checkpointing
        draft.attention = draft_cfg.attention
        return draft

    def embed(self, input_ids: Tensor) -> Tensor:
        return self.embed_tokens(input_ids)

    def fuse_aux(self, aux_hidden_states: Tensor) -> Tensor:
        """fc of the concatenated aux states, after input_norm (norm_before_fc), then per-layer fc_norm."""
        x = aux_hidden_states.to(self.fc.weight.dtype)
        if self.config.norm_before_fc:
            x = self.input_norm(x)
        if self.config.fc_norm:
            x = torch.cat([norm(chunk) for norm, chunk
                           in zip(self.fc_norm, x.chunk(len(self.fc_norm), -1))], -1)
        return self.fc(x)

    def next_step_hidden(self, out_hidden: Tensor) -> Tensor:
        """What the next draft step reads: the out hidden, or norm(out) with norm_output (vLLM's
        aux_output)."""
        return self.norm(out_hidden) if self.config.norm_output else out_hidden

    def new_cache(self) -> DraftKVCache:
        return DraftKVCache(len(self.layers))

    def step(
        self,
        hidden: Tensor,
        ids_or_embeds: Tensor,
        position_ids: Tensor,
        cache: DraftKVCache,
        is_aux: Optional[bool] = None,
    ) -> Tuple[Tensor, Tensor]:
        if is_aux is None:
            aux_size, size = self.fc.in_features, self.config.hidden_size
            if aux_size == size:
                raise ValueError("step: aux and draft hidden sizes are equal; pass is_aux explicitly")
            if hidden.shape[-1] not in (aux_size, size):
                raise ValueError(f"step: hidden last dim {hidden.shape[-1]} is neither {aux_size} (aux) "
                                 f"nor {size}")
            is_aux = hidden.shape[-1] == aux_size
        if is_aux:
            hidden = self.fuse_aux(hidden)
        embeds = self.embed(ids_or_embeds) if not ids_or_embeds.is_floating_point() else ids_or_embeds
        embeds = embeds.to(hidden.dtype)
        cos, sin = self.rotary_emb(position_ids, hidden.dtype)
        past, new = len(cache), hidden.shape[1]
        visible = torch.ones(new, past + new, dtype=torch.bool, device=hidden.device).tril(past)
        for index, layer in enumerate(self.layers):
            q, k, v, residual = layer.attention_inputs(embeds, hidden, cos, sin)
            k, v = cache.append(index, k, v)
            attended = F.scaled_dot_product_attention(
                q, k, v, attn_mask=visible, scale=layer.self_attn.scale, enable_gqa=True
            )
            hidden = layer.finish(attended, residual)
        return self.compute_logits(hidden), self.next_step_hidden(hidden)

    def extend(self, aux_hidden_states: Tensor, ids_or_embeds: Tensor, position_ids: Tensor,
               cache: DraftKVCache):
        """Append target positions (their aux states and next-token ids) to the cache; same returns as
        step."""
        return self.step(aux_hidden_states, ids_or_embeds, position_ids, cache, is_aux=True)
