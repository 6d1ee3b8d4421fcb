"""The oracle bound: the mean acceptance length τ a perfect draft would reach, to read a measured τ against.

Chain drafting of k tokens, per verification mode:
- greedy (T = 0): a draft equal to the target's argmax is always accepted: τ = k + 1.
- sampled (T > 0, the draft's own distribution q passed to the verifier, as `aerie eval` does): q = p is
  always accepted too: τ = k + 1.
- target_only (T > 0, vLLM's default for chain drafts: greedy drafts, no draft probabilities, so a token x is
  accepted with the target's probability p(x)): the best draft proposes the target's argmax chain, accepted
  step by step with probability max_v p(v) under the context of the chain so far.  τ is bounded by how
  peaked the target is; we compute it from the target's own probabilities at temperature T along its argmax
  chains, starting at every position of the target's own generations (prompt excluded).

One target pass per chain depth: the generated sequence, then the chain tokens of every start at once, each
seeing its start's prefix (kept in the KV cache) and its own earlier chain tokens through a 4D attention mask.
"""
from __future__ import annotations

import inspect
from typing import List, Sequence

import torch
from torch import Tensor, nn

VERIFICATIONS = ("greedy", "sampled", "target_only")


@torch.no_grad()
def chain_accept_probs(target: nn.Module, sequence: Sequence[int], starts: Sequence[int], k: int,
                       temperature: float) -> Tensor:
    """(len(starts), k): max_v p_T(v | x_<=s, g_1..g_j) along the argmax chain g from each start s."""
    from transformers import DynamicCache

    device = next(target.parameters()).device
    cache_kwarg = "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"
    n, num_starts = len(sequence), len(starts)
    start_ids = torch.tensor(list(starts), device=device)
    cache = DynamicCache()
    logits = target(input_ids=torch.tensor([list(sequence)], device=device), use_cache=True,
                    **{cache_kwarg: cache}).logits[0, start_ids]
    probs, rows = [], torch.arange(num_starts, device=device)
    for depth in range(1, k + 1):
        step_probs = torch.softmax(logits.float() / temperature, -1)
        top, chain_token = step_probs.max(-1)
        probs.append(top)
        if depth == k:
            break
        allowed = torch.zeros(num_starts, n + depth * num_starts, dtype=torch.bool, device=device)
        allowed[:, :n] = torch.arange(n, device=device)[None] <= start_ids[:, None]
        for earlier in range(depth):  # this start's chain tokens of rounds 1..depth (the last one: itself)
            allowed[rows, n + earlier * num_starts + rows] = True
        dtype = next(target.parameters()).dtype
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        logits = target(input_ids=chain_token[None], position_ids=(start_ids + depth)[None],
                        attention_mask=mask[None, None], use_cache=True, **{cache_kwarg: cache}).logits[0]
    return torch.stack(probs, -1)


def chain_tau(accept_probs: Tensor) -> float:
    """Mean over starts of 1 + sum_i prod_{j<=i} a_j (rows: starts, columns: draft positions)."""
    return float((1 + torch.cumprod(accept_probs.double(), -1).sum(-1)).mean())


@torch.no_grad()
def oracle_tau(target: nn.Module, prompts: List[List[int]], generations: List[List[int]], k: int,
               temperature: float, verification: str, max_starts: int = 64) -> float:
    """τ of a perfect draft on these prompts and the target's own generations for them (see the module doc).

    target_only evaluates at most `max_starts` evenly spaced starts per generation."""
    if verification not in VERIFICATIONS:
        raise ValueError(f"verification must be one of {', '.join(VERIFICATIONS)}, got {verification!r}")
    if temperature <= 0 or verification != "target_only":
        return float(k + 1)
    rows = []
    for prompt, generated in zip(prompts, generations):
        sequence = list(prompt) + list(generated)
        starts = list(range(len(prompt) - 1, len(sequence) - 1))
        if len(starts) > max_starts:
            starts = [starts[round(i * (len(starts) - 1) / (max_starts - 1))] for i in range(max_starts)]
        if starts:
            rows.append(chain_accept_probs(target, sequence, starts, k, temperature))
    return chain_tau(torch.cat(rows)) if rows else float("nan")


def with_oracle(run: dict, target: nn.Module, prompts, generations, temperature: float,
                verify: str = "exact") -> dict:
    """`run` (a summarize() dict) plus oracle_tau under the eval's verification (eval.verify: `exact` passes
    the draft's q, so a perfect draft gets k + 1; `target_only` is bounded by the target's peakedness), the
    fraction of it that τ reached, and at T > 0 the target-only bound of vLLM's default verification."""
    k = run["num_speculative_tokens"]
    if temperature <= 0:
        verification = "greedy"
    else:
        verification = "target_only" if verify == "target_only" else "sampled"
    oracle = oracle_tau(target, prompts, generations, k, temperature, verification)
    extra = {"oracle_tau": oracle, "tau_of_oracle": run["tau"] / oracle}
    if temperature > 0:
        extra["oracle_tau_target_only"] = (oracle if verification == "target_only" else
                                           oracle_tau(target, prompts, generations, k, temperature,
                                                      "target_only"))
    return {**run, **extra}
