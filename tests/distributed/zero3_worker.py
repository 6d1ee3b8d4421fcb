"""One rank of the 2-rank ZeRO-3 target test (launched by test_zero3.py with the deepspeed launcher).

argv: tiny model dir, result json path. Rank 0 writes what the test asserts.
"""
import json
import sys

import torch
from torch import nn

from models.targets.base import TargetConfig
from models.targets.hf import HFTargetModel


def main(path: str, result_path: str) -> None:
    cfg = TargetConfig(path=path, dtype="float32", aux_layer_ids=[1, 2, 3], logits_chunk_size=8)
    reference = HFTargetModel.load(cfg)  # unsharded, loaded before any DeepSpeed config exists
    ds_config = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3}, "zero_allow_untested_optimizer": True}
    target = HFTargetModel.load(cfg, ds_config)
    import deepspeed

    container = nn.Module()
    container.target = target.module
    container.dummy = nn.Parameter(torch.zeros(4))  # the optimizer needs one trainable parameter
    engine, *_ = deepspeed.initialize(model=container, config=ds_config, model_parameters=[container.dummy],
                                      optimizer=torch.optim.SGD([container.dummy], lr=0.1))
    params = list(target.module.parameters())
    local = sum(p.ds_tensor.numel() for p in params)
    total = sum(p.ds_numel for p in params)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 512, (2, 12), generator=g)
    batch = {"input_ids": ids, "position_ids": torch.arange(12).repeat(2, 1),
             "document_ids": torch.tensor([[0] * 12, [0] * 5 + [1] * 4 + [-1] * 3])}
    batch["position_ids"][1, 5:9] = torch.arange(4)
    draft_ids = torch.tensor([1, 2, 50, 300])
    sharded = target(batch, draft_ids)
    full = reference(batch, draft_ids)
    valid = batch["document_ids"] >= 0
    embed = target.embed_tokens_weight()
    result = {
        "rank": torch.distributed.get_rank(), "local": local, "total": total,
        "aux_max_diff": (sharded.aux_hidden_states - full.aux_hidden_states)[valid].abs().max().item(),
        "logits_max_diff": (sharded.teacher_logits - full.teacher_logits)[valid].abs().max().item(),
        "argmax_equal": bool(torch.equal(sharded.teacher_argmax[valid], full.teacher_argmax[valid])),
        "embed_equal": bool(torch.equal(embed, reference.embed_tokens_weight())),
        "grad_free": not any(p.requires_grad for p in params),
    }
    gathered = [None, None]
    torch.distributed.all_gather_object(gathered, result)
    if result["rank"] == 0:
        with open(result_path, "w") as f:
            json.dump(gathered, f)
    del engine


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
