"""vLLM's rejection sampler on a case computed by hand, run in vLLM's own environment (no engine start)."""
import json

import pytest

pytestmark = pytest.mark.slow


# vLLM's rejection sampler on a case small enough to compute by hand: one draft token over a 4-token vocabulary.
# p = target, q = draft.  Exact speculative sampling accepts with sum_x min(p, q) = 0.1 + 0.1 + 0.1 + 0 = 0.30; a
# sampler that is not given q (draft_probs=None, as for a deterministic draft) accepts x ~ q with p(x):
# sum_x q p = 0.06 + 0.03 + 0.04 = 0.13.  Both keep the output distributed as p.
REJECTION_CASE = """
import json, torch
from vllm.platforms import current_platform
current_platform.register_triton_kernel_overrides()
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.rejection_sampler import rejection_sample
n = 20000
p, q = torch.tensor([0.6, 0.3, 0.1, 0.0]), torch.tensor([0.1, 0.1, 0.4, 0.4])
draft = torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(0)).to(torch.int32)
meta = SamplingMetadata(temperature=torch.ones(n), all_greedy=False, all_random=True, top_p=None, top_k=None,
    generators={}, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
    frequency_penalties=torch.zeros(n), presence_penalties=torch.zeros(n), repetition_penalties=torch.ones(n),
    output_token_ids=[[] for _ in range(n)], allowed_token_ids_mask=None, bad_words_token_ids={},
    logitsprocs=LogitsProcessors())
out = {}
for name, draft_probs in (("q", q.expand(n, 4).contiguous()), ("none", None)):
    tokens = rejection_sample(draft, [1] * n, 1, torch.arange(1, n + 1, dtype=torch.int32), draft_probs,
                              p.clamp_min(1e-30).log().expand(n, 4).contiguous(), torch.full((n, 1), 3), meta)
    out[name] = {"accepted": (tokens[:, 1] != -1).double().mean().item(),
                 "first": torch.bincount(tokens[:, 0].long(), minlength=4).div(n).tolist()}
print(json.dumps(out))
"""


def test_vllm_rejection_sampler_by_hand():
    import subprocess

    from trainer.vllm_engine import vllm_python

    proc = subprocess.run([vllm_python(), "-c", REJECTION_CASE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # 20,000 draws: one standard error of a rate is <= 0.0035
    assert out["q"]["accepted"] == pytest.approx(0.30, abs=0.015)
    assert out["none"]["accepted"] == pytest.approx(0.13, abs=0.015)
    for name in ("q", "none"):
        assert out[name]["first"] == pytest.approx([0.6, 0.3, 0.1, 0.0], abs=0.015)
