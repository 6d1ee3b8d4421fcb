"""Speculative decoding inside the training loop: the callback `aerie train` hands the Trainer
(trainer.spec_eval_every), so that trainer/ never imports decoding code."""
from __future__ import annotations

from typing import Dict

import torch
from omegaconf import OmegaConf

from tools.eval.decode import EvalConfig, evaluate_draft
from tools.eval.vllm import evaluate_state_with_vllm
from tools.vllm.engine import check_engine_name
from trainer.distributed import barrier, broadcast_object
from trainer.train import gathered_draft_state


@torch.no_grad()
def speculative_eval(trainer) -> Dict[str, float]:
    """Real acceptance length of the current draft with the in-loop target (rank 0 decodes, others wait) or
    with vLLM on an export of the gathered weights (trainer.spec_eval_engine=vllm)."""
    on_vllm = check_engine_name(trainer.cfg.trainer.spec_eval_engine) == "vllm"
    if not on_vllm and (trainer.target is None or trainer.cfg.deepspeed.zero_stage == 3):
        raise ValueError("trainer.spec_eval_every needs online mode with the whole target on each rank "
                         "(deepspeed zero1/zero2), or trainer.spec_eval_engine=vllm; use `aerie eval` on "
                         "checkpoints otherwise")
    state = gathered_draft_state(trainer.draft) if on_vllm else None  # every rank takes part in the gather
    metrics = {}
    if trainer.dist.is_main:
        ecfg = EvalConfig(**{**OmegaConf.to_container(trainer.cfg.eval, resolve=True), "out_dir": "",
                             "max_prompts": trainer.cfg.trainer.spec_eval_max_prompts})
        if on_vllm:
            summary = evaluate_state_with_vllm(trainer.draft, state, trainer.cfg, ecfg,
                                               trainer.run_dir / "spec_eval")
        else:
            trainer.draft.eval()
            summary = evaluate_draft(trainer.target.module, trainer.draft, trainer.target.tokenizer, ecfg)
            trainer.draft.train()
        for run in summary["results"]:
            k = run["num_speculative_tokens"]
            metrics[f"spec_tau_k{k}"] = run["tau"]
            metrics.update({f"spec_accept_k{k}_{i}": a for i, a in enumerate(run["acceptance_per_position"])})
    metrics = broadcast_object(metrics)
    barrier()
    return metrics
