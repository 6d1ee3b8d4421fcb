"""HF transformers target backend: any causal LM (and Qwen VL/audio models) frozen, with aux-state hooks.

One batched, padding- and packing-aware forward: a 4D mask keeps attention inside each document
(``document_ids``), positions come from the batch. Aux states are captured by forward pre-hooks on
the chosen decoder layers (the input to layer id); the model's own lm_head is never run over the
batch: teacher logits come from ``teacher_from_hidden`` in chunks of positions.
"""
from __future__ import annotations

import contextlib
import os
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn

from models.registry import MODALITIES, TARGETS
from models.targets.base import (
    TargetConfig,
    TargetModel,
    TargetOutput,
    TargetSpec,
    resolve_aux_layer_ids,
    resolve_dtype,
)
from models.targets.capture import AuxCapture
from models.targets.meta import decoder_of, model_class_for
from models.targets.teacher import chunked_teacher_logits, final_logit_softcap, plain_head_weights


def zero_stage(ds_config: Optional[dict]) -> int:
    return int(((ds_config or {}).get("zero_optimization") or {}).get("stage", 0))


def is_partitioned(param: Tensor) -> bool:
    return hasattr(param, "ds_id")


def gathered(params: List[Tensor]):
    """Context gathering ZeRO-3 partitioned params (no-op for ordinary tensors)."""
    params = [p for p in params if p is not None and is_partitioned(p)]
    if not params:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def check_attn_implementation(cfg: TargetConfig) -> None:
    if cfg.attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"target attn_implementation {cfg.attn_implementation!r} unsupported: "
                         "the packed-document 4D mask needs 'sdpa' or 'eager'")


def document_attention_mask(document_ids: Tensor, dtype: torch.dtype, boolean: bool,
                            sliding_window: Optional[int] = None) -> Tensor:
    """(B, L) document ids (-1 = padding) -> (B, 1, L, L) causal mask that never crosses documents.

    Padding rows attend to themselves only (keeps softmax finite; their outputs are never used).
    """
    length = document_ids.shape[1]
    pos = torch.arange(length, device=document_ids.device)
    causal = pos[None, :] <= pos[:, None]
    if sliding_window:
        causal = causal & (pos[:, None] - pos[None, :] < sliding_window)
    same_doc = document_ids[:, :, None] == document_ids[:, None, :]
    valid = (document_ids >= 0)[:, :, None]
    allowed = ((causal[None] & same_doc & valid)
               | torch.eye(length, dtype=torch.bool, device=document_ids.device)[None])
    allowed = allowed[:, None]
    if boolean:
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


@TARGETS.register("hf")
class HFTargetModel(TargetModel):
    def __init__(self, module: nn.Module, cfg: TargetConfig, tokenizer=None, processor=None,
                 name_or_path: str = ""):
        self.cfg = cfg
        self.module = module
        self.tokenizer = tokenizer
        self.processor = processor
        self.adapter_cls = MODALITIES.get(cfg.modality)
        module.requires_grad_(False)
        module.eval()
        self.decoder = decoder_of(module)
        self.text_config = self.decoder.config
        num_layers = len(self.decoder.layers)
        self.aux_layer_ids = resolve_aux_layer_ids(cfg.aux_layer_ids, num_layers)
        self.spec = self._make_spec(name_or_path or cfg.path, num_layers)
        self.lm_head = module.get_output_embeddings()
        self.softcap = final_logit_softcap(module.config)
        check_attn_implementation(cfg)
        self._capture = AuxCapture(self.decoder, self.aux_layer_ids)

    def _make_spec(self, name_or_path: str, num_layers: int) -> TargetSpec:
        c = self.text_config
        rope = dict(getattr(c, "rope_parameters", None) or getattr(c, "rope_scaling", None) or {})
        rope_theta = float(rope.get("rope_theta", getattr(c, "rope_theta", 10000.0)))
        rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
        # HF always interleaves; [24, 20, 20] default
        if c.model_type in ("qwen3_vl_text", "qwen3_vl_moe_text"):
            rope_scaling = {"mrope_section": [24, 20, 20], **rope_scaling, "mrope_interleaved": True}
        if rope_scaling.get("rope_type", "default") == "default" and set(rope_scaling) <= {"rope_type"}:
            rope_scaling = None
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        top = self.module.config
        return TargetSpec(
            name_or_path=name_or_path, model_type=top.model_type, architectures=list(top.architectures or []),
            num_layers=num_layers, hidden_size=c.hidden_size,
            intermediate_size=getattr(c, "intermediate_size", None) or getattr(c, "moe_intermediate_size", 0),
            vocab_size=c.vocab_size, num_attention_heads=c.num_attention_heads,
            num_key_value_heads=getattr(c, "num_key_value_heads", None) or c.num_attention_heads,
            head_dim=head_dim, rms_norm_eps=float(getattr(c, "rms_norm_eps", 1e-6)), rope_theta=rope_theta,
            rope_scaling=rope_scaling, max_position_embeddings=getattr(c, "max_position_embeddings", 0),
            aux_layer_ids=list(self.aux_layer_ids))

    @classmethod
    def load(cls, cfg: TargetConfig, ds_config: Optional[dict] = None) -> "HFTargetModel":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        adapter_cls = MODALITIES.get(cfg.modality)  # unknown name -> ValueError before loading weights
        check_attn_implementation(cfg)
        model_cls = model_class_for(config, cfg)
        kwargs = dict(dtype=resolve_dtype(cfg.dtype) or "auto", attn_implementation=cfg.attn_implementation)
        if cfg.trust_remote_code:
            kwargs["trust_remote_code"] = True
        hf_ds_config = None
        if zero_stage(ds_config) == 3:
            import deepspeed
            from transformers.integrations import HfDeepSpeedConfig

            if not torch.distributed.is_initialized():
                deepspeed.init_distributed()
            hf_ds_config = HfDeepSpeedConfig(ds_config)  # from_pretrained sees it and loads under zero.Init
        module = model_cls.from_pretrained(cfg.path, **kwargs)
        tokenizer, processor = load_tokenizer_and_processor(cfg, adapter_cls.is_multimodal)
        target = cls(module, cfg, tokenizer=tokenizer, processor=processor, name_or_path=cfg.path)
        # HfDeepSpeedConfig is held by weakref in transformers: keep it alive
        target._hf_ds_config = hf_ds_config
        return target

    # ---- forward -------------------------------------------------------------------------------
    def _attention_mask(self, document_ids: Tensor, dtype: torch.dtype):
        c = self.text_config
        boolean = self.cfg.attn_implementation == "sdpa"
        full = document_attention_mask(document_ids, dtype, boolean)
        window = getattr(c, "sliding_window", None)
        layer_types = getattr(c, "layer_types", None)
        if window and layer_types and "sliding_attention" in layer_types:
            return {"full_attention": full,
                    "sliding_attention": document_attention_mask(document_ids, dtype, boolean, window)}
        if window and layer_types is None and getattr(c, "use_sliding_window", True):
            return document_attention_mask(document_ids, dtype, boolean, window)
        return full

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder.embed_tokens.weight.dtype

    def _run(self, batch: dict) -> Tuple[Tensor, Tensor, bool]:
        """Runs the decoder (through the multimodal base model when the adapter needs it).

        -> (inputs_embeds the decoder saw, its position ids, whether the embeddings are multimodal)."""
        mask = self._attention_mask(batch["document_ids"], self.dtype)
        if not self.adapter_cls.is_multimodal:
            inputs_embeds = self.decoder.embed_tokens(batch["input_ids"])
            self.decoder(inputs_embeds=inputs_embeds, attention_mask=mask, position_ids=batch["position_ids"],
                         use_cache=False)
            return inputs_embeds, batch["position_ids"], False
        seen = {}

        def hook(module, args, kwargs):
            seen["inputs_embeds"], seen["position_ids"] = kwargs["inputs_embeds"], kwargs["position_ids"]

        handle = self.decoder.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model_inputs = self.adapter_cls.model_inputs(self, batch)
            self.module.model(input_ids=batch["input_ids"], attention_mask=mask, use_cache=False,
                              **model_inputs)
        finally:
            handle.remove()
        return seen["inputs_embeds"], seen["position_ids"], True

    @torch.no_grad()
    def forward(self, batch: dict, draft_token_ids: Tensor, return_last_hidden: bool = False) -> TargetOutput:
        for key in ("input_ids", "position_ids", "document_ids"):
            if key not in batch:
                raise ValueError(f"target batch lacks {key!r} (has {sorted(batch)})")
        try:
            inputs_embeds, position_ids, multimodal = self._run(batch)
            aux_hidden_states, last_hidden_state = self._capture.pop()
        finally:
            self._capture.clear()
        teacher_logits, teacher_argmax = self.teacher_from_hidden(last_hidden_state, draft_token_ids)
        return TargetOutput(
            aux_hidden_states=aux_hidden_states, teacher_logits=teacher_logits, teacher_argmax=teacher_argmax,
            last_hidden_state=last_hidden_state if return_last_hidden else None,
            inputs_embeds=(inputs_embeds if multimodal and self.adapter_cls.draft_reads_media_embeddings
                           else None),
            position_ids=position_ids if position_ids.dim() == 3 else None)

    @torch.no_grad()
    def teacher_from_hidden(self, last_hidden_state: Tensor,
                            draft_token_ids: Tensor) -> Tuple[Tensor, Tensor]:
        norm = self.decoder.norm
        with gathered(list(norm.parameters()) + list(self.lm_head.parameters())):
            return chunked_teacher_logits(last_hidden_state, norm, self.lm_head.weight, self.lm_head.bias,
                                          draft_token_ids, self.cfg.logits_chunk_size, self.softcap)

    @torch.no_grad()
    def embed_tokens_weight(self) -> Tensor:
        weight = self.decoder.embed_tokens.weight
        with gathered([weight]):
            return weight.detach().clone()

    @torch.no_grad()
    def head_weights(self) -> Tuple[Tensor, Tensor]:
        norm = self.decoder.norm
        with gathered(list(norm.parameters()) + list(self.lm_head.parameters())):
            return tuple(w.clone() for w in plain_head_weights(norm, self.lm_head, self.cfg.path))


def load_tokenizer_and_processor(cfg: TargetConfig, multimodal: bool):
    """Tokenizer (and processor for multimodal targets); None for a local checkpoint dir without those files.

    The processor is the image processor / feature extractor the adapters call (what AutoProcessor wraps)."""
    local = os.path.isdir(cfg.path)

    def has(*names):
        return not local or any(os.path.exists(os.path.join(cfg.path, f)) for f in names)

    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    tokenizer = None
    if has("tokenizer.json", "tokenizer_config.json"):
        tokenizer = AutoTokenizer.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    processor = None
    if multimodal and has("preprocessor_config.json", "processor_config.json"):
        try:
            processor = AutoProcessor.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
        except (ImportError, OSError, ValueError, TypeError):  # e.g. no torchvision for the video processor
            processor = AutoImageProcessor.from_pretrained(cfg.path, trust_remote_code=cfg.trust_remote_code)
    return tokenizer, processor
