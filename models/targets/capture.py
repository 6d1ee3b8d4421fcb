"""The target's hidden states Aerie reads, captured by forward pre-hooks: the inputs of the aux layers (what
Eagle-style drafts fuse) and, optionally, of the final norm (the last hidden state, for the teacher).  Used by
the training target (models/targets/hf.py) and by speculative decoding (tools/eval/)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn


class AuxCapture:
    """Hooks on decoder.layers[aux_layer_ids] (and decoder.norm with capture_last) until `remove()`."""

    def __init__(self, decoder: nn.Module, aux_layer_ids: List[int], capture_last: bool = True):
        self.aux_layer_ids = list(aux_layer_ids)
        self.captured: Dict[object, Tensor] = {}
        self.handles = [decoder.layers[layer_id].register_forward_pre_hook(self._hook(layer_id),
                                                                           with_kwargs=True)
                        for layer_id in sorted(set(self.aux_layer_ids))]
        if capture_last:
            self.handles.append(decoder.norm.register_forward_pre_hook(self._hook("last"), with_kwargs=True))

    def _hook(self, key):
        def hook(module, args, kwargs):
            self.captured[key] = args[0] if args else kwargs["hidden_states"]

        return hook

    def pop(self) -> Tuple[Tensor, Optional[Tensor]]:
        """(aux states concatenated over the aux layers (..., num_aux * H), last hidden state or None);
        clears."""
        aux = torch.cat([self.captured[i] for i in self.aux_layer_ids], dim=-1)
        last = self.captured.get("last")
        self.clear()
        return aux, last

    def clear(self) -> None:
        self.captured = {}

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.captured = [], {}
