"""Block drafting with an HF target and a DFlash draft (`aerie eval` engine=hf), step for step as vLLM's
proposer.

Prefill: the target runs the prompt; its aux states at positions 0..P-1 become the draft's context and its
next token x_P is the bonus token.  Each round: one draft pass proposes k tokens from [x_n, MASK x k] at
positions n..n+k; the target verifies [x_n, d_1..d_k] in one forward; the accepted drafts plus the target's
next token are kept; the aux states of the verified positions n..n+accepted extend the context; the target's
token is the next bonus.  T = 0: greedy verification (vLLM's counts); T > 0: eval.verify as SpeculativeDecoder
does for chain drafts (target_only: each position's argmax accepted with the target's probability; exact:
sampled from its softmax).
"""
from __future__ import annotations

import time

import torch

from tools.eval.decode import DecodeResult, SpeculativeDecoder


class BlockSpeculativeDecoder(SpeculativeDecoder):
    """SpeculativeDecoder with one DFlash block per round instead of a chain of draft steps."""

    def _propose_block(self, result: DecodeResult, bonus: int, position: int, k: int, context, temperature,
                       generator, verify: str):
        self._sync()
        start = time.perf_counter()
        logits = self.draft.draft_block(torch.tensor([bonus], device=self.device),
                                        torch.tensor([position], device=self.device), k, context)[0].float()
        self._sync()
        result.draft_seconds += time.perf_counter() - start
        result.num_draft_calls += 1
        drafts, qs = zip(*(self._propose(row, temperature, generator, verify) for row in logits))
        return list(drafts), list(qs)

    def _generate(self, prompt, max_new_tokens, k, temperature, generator, eos, cache,
                  verify) -> DecodeResult:
        result, last, aux = self._first_token(prompt, cache, temperature, generator)
        num_seen = len(prompt)  # positions verified by the target, all in the draft's context
        context = self.draft.new_context()
        self.draft.extend_context(aux, torch.arange(num_seen, device=self.device)[None], context)
        while len(result.tokens) < max_new_tokens and last not in eos:
            drafts, qs = self._propose_block(result, last, num_seen, k, context, temperature, generator,
                                             verify)
            accepted, nxt, aux = self._verify(result, cache, num_seen, last, drafts, qs, temperature,
                                              generator)
            positions = torch.arange(num_seen, num_seen + accepted + 1, device=self.device)[None]
            self.draft.extend_context(aux[:, :accepted + 1], positions, context)
            num_seen += accepted + 1
            last = self._emit(result, drafts[:accepted] + [nxt], eos, max_new_tokens)
        return result
