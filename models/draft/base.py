"""The draft protocol: what the trainer, export, eval and plan may ask of any draft architecture.

A new architecture is one folder/module under models/draft/ that subclasses `DraftModel`, registers itself in
models.registry.DRAFTS under its `architecture` name, and one conf/draft/<name>.yaml.  Nothing outside
models/draft/ names a concrete draft class: they build drafts with `DRAFTS.get(arch).from_target(cfg, spec)`,
read them back with models/draft/io.py, and export them with the formats in tools/export/ that list the
architecture in their `archs`.

    config_class        the Hydra schema of conf/draft/<name>.yaml (has `arch`, `num_layers`,
                        `draft_vocab_size`)
    model_config_class  the serialised model config (to_dict / from_dict), config.json of an Aerie draft dir
    architecture        the registered name
    drafting            "chain" (new_cache / step / extend, one token per step) or "block" (new_context /
                        extend_context / draft_block, k tokens per pass): which decoder tools/eval/ runs
"""
from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn


class DraftModel(nn.Module):
    """Base of every draft: a frozen target embedding, a draft vocabulary (d2t / t2d buffers) and an
    lm_head."""

    config_class: ClassVar[type]
    model_config_class: ClassVar[type]
    architecture: ClassVar[str]
    drafting: ClassVar[str] = "chain"  # chain: one token per step (new_cache/step/extend); block: k per pass

    config: Any
    embed_tokens: nn.Embedding
    d2t: Tensor
    t2d: Tensor

    @classmethod
    def from_target(cls, draft_cfg, spec) -> "DraftModel":
        """The draft sized from its conf/draft/ settings and the target's TargetSpec
        (models/targets/base.py)."""
        raise NotImplementedError(f"{cls.__name__} must define from_target")

    def load_embedding(self, weight: Tensor) -> None:
        """Copy the target's (V, H) input embedding into the frozen embed_tokens."""
        if tuple(weight.shape) != tuple(self.embed_tokens.weight.shape):
            expected = tuple(self.embed_tokens.weight.shape)
            raise ValueError(f"embedding weight shape {tuple(weight.shape)} != expected {expected}")
        with torch.no_grad():
            self.embed_tokens.weight.copy_(weight)

    def set_draft_vocab(self, d2t: Tensor, t2d: Tensor) -> None:
        """The draft vocabulary: target id of draft id i is i + d2t[i]; t2d[v] says whether v is in it."""
        vd, v = self.config.draft_vocab_size, self.config.vocab_size
        if tuple(d2t.shape) != (vd,) or tuple(t2d.shape) != (v,):
            shapes = f"d2t {tuple(d2t.shape)}, t2d {tuple(t2d.shape)}"
            raise ValueError(f"draft vocab shapes {shapes}; expected ({vd},), ({v},)")
        target_ids = torch.arange(vd) + d2t.long().cpu()
        t2d_cpu = t2d.bool().cpu()
        if (int(t2d_cpu.sum()) != vd or not bool(t2d_cpu[target_ids.clamp(0, v - 1)].all())
                or target_ids.max() >= v):
            raise ValueError("draft vocab: d2t and t2d disagree "
                             "(t2d must be True exactly at the ids i + d2t[i])")
        self.d2t.copy_(d2t.long())
        self.t2d.copy_(t2d.bool())

    def draft_token_ids(self) -> Tensor:
        """The target ids of the draft vocabulary, in draft-id order."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    def to_target_ids(self, draft_ids: Tensor) -> Tensor:
        return draft_ids + self.d2t[draft_ids]

    def trainable_parameters(self) -> list:
        """Everything but the frozen target embedding."""
        return [p for name, p in self.named_parameters() if not name.startswith("embed_tokens.")]

    def load_head(self, norm_weight: Tensor, lm_head_weight: Tensor) -> None:
        """Start `norm` and `lm_head` from the target's final norm and the draft-vocabulary rows of its
        (V, H) lm_head (draft.init_head=target), so the draft begins with the target's readout."""
        rows = lm_head_weight.index_select(0, self.draft_token_ids().to(lm_head_weight.device))
        head, norm = tuple(self.lm_head.weight.shape), tuple(self.norm.weight.shape)
        if tuple(rows.shape) != head or tuple(norm_weight.shape) != norm:
            raise ValueError(f"draft.init_head=target: the target's lm_head {tuple(lm_head_weight.shape)} "
                             f"and norm {tuple(norm_weight.shape)} do not fit the draft's lm_head {head} "
                             "(draft hidden size must be the target's)")
        with torch.no_grad():
            self.lm_head.weight.copy_(rows)
            self.norm.weight.copy_(norm_weight)

    def compute_logits(self, hidden: Tensor) -> Tensor:
        """Draft-vocabulary logits of output hidden states."""
        return self.lm_head(self.norm(hidden))
