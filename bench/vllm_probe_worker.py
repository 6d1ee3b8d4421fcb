"""What reaches vLLM's rejection sampler in a real Eagle3 run: `python vllm_probe_worker.py JOB.json
OUT.json`.

Runs in vLLM's own environment (vllm, torch, stdlib), for bench/vllm_probe.py.  It wraps
`vllm.v1.sample.rejection_sampler.rejection_sample` (what RejectionSampler.forward calls) and records, for
every draft token vLLM verifies, from the very tensors it is handed: whether draft probabilities came at all,
q(x) (the draft's probability of its token x), p(x) (the target's, after vLLM's temperature),
Σ_v min(p(v), q(v)) (the exact acceptance probability of x ~ q), and whether vLLM accepted x; tokens after a
rejection are not verified and not counted.  A job is the standard worker's (tools/vllm/worker.py, imported
from the job's "worker_dir") plus, per run, "fix_cpu_expand" (apply that worker's fix of vLLM's CPU
expand_kernel when it is broken); each run's result adds "cpu_expand_kernel_fixed" and "probe": {"num_calls",
"num_calls_without_draft_probs", "samples", "positions": [{"num_tokens", "num_with_q", "sum_accepted",
"sum_min_ratio", "sum_overlap", "sum_q_of_x", "num_q_zero"}]}.
"""
import json
import os
import sys


class Probe:
    def __init__(self, num_positions: int):
        self.num_calls = self.num_calls_without_draft_probs = 0
        keys = ("num_tokens", "num_with_q", "sum_accepted", "sum_min_ratio", "sum_overlap", "sum_q_of_x",
                "num_q_zero")
        self.positions = [dict.fromkeys(keys, 0.0) for _ in range(num_positions)]
        self.samples = []  # the first calls' draft tokens, p(x), q(x) and output rows, to read by eye

    def wrap(self, rejection_sample):
        def probed(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens, draft_probs,
                   target_logits, bonus_token_ids, sampling_metadata, *args, **kwargs):
            # copies first: the sampler may work in place on what it is handed
            seen = (draft_token_ids.clone(), list(num_draft_tokens),
                    None if draft_probs is None else draft_probs.float().clone(),
                    target_logits.float().clone())
            out = rejection_sample(draft_token_ids, num_draft_tokens, max_spec_len, cu_num_draft_tokens,
                                   draft_probs, target_logits, bonus_token_ids, sampling_metadata, *args,
                                   **kwargs)
            self.record(*seen, out)
            return out

        return probed

    def record(self, draft_token_ids, num_draft_tokens, draft_probs, target_logits, out):
        import torch

        self.num_calls += 1
        self.num_calls_without_draft_probs += draft_probs is None
        p = target_logits.float().softmax(-1)  # what rejection_sample itself computes from these logits
        rows = torch.arange(len(draft_token_ids))
        x = draft_token_ids.long()
        p_x = p[rows, x]
        q = draft_probs.float() if draft_probs is not None else None
        if len(self.samples) < 4:
            self.samples.append({"x": x.tolist(), "p_x": p_x.tolist(), "out": out.tolist(),
                                 "q_x": None if q is None else q[rows, x].tolist()})
        start = 0
        for req, num in enumerate(num_draft_tokens):
            for i in range(num):
                row, stats = start + i, self.positions[i]
                accepted = int(out[req, i]) == int(x[row])  # a rejection writes a recovered token != x
                stats["num_tokens"] += 1
                stats["sum_accepted"] += accepted
                if q is None:  # vLLM's no-q rule: accept x with p(x)
                    stats["sum_min_ratio"] += float(p_x[row])
                else:
                    q_x = float(q[row, x[row]])
                    stats["num_with_q"] += 1
                    stats["sum_q_of_x"] += q_x
                    stats["num_q_zero"] += q_x <= 0
                    stats["sum_min_ratio"] += min(1.0, float(p_x[row]) / q_x) if q_x > 0 else 1.0
                    stats["sum_overlap"] += float(torch.minimum(p[row], q[row]).sum())
                if not accepted:
                    break
            start += num


def main(argv) -> int:
    import vllm.v1.sample.rejection_sampler as rs

    with open(argv[1]) as handle:
        job = json.load(handle)
    sys.path.insert(0, job["worker_dir"])
    # the standard worker (tools/vllm/worker.py): one LLM per run, vLLM's own counters
    import worker as vllm_worker
    from vllm.utils import cpu_triton_utils

    shipped = cpu_triton_utils._expand_kernel_impl
    broken = vllm_worker.cpu_expand_kernel_loses_floats()
    original, runs = rs.rejection_sample, []
    for run in job["runs"]:
        spec = run.get("speculative_config") or {}
        probe = Probe(int(spec.get("num_speculative_tokens", 0)))
        rs.rejection_sample = probe.wrap(original)
        # run["fix_cpu_expand"]: the worker's fix of vLLM's CPU expand_kernel (registered when the LLM starts)
        fix = broken and run.get("fix_cpu_expand")
        cpu_triton_utils._expand_kernel_impl = vllm_worker.expand_tokens if fix else shipped
        try:
            result = vllm_worker.run_one(job, run)
        finally:
            rs.rejection_sample = original
        result["cpu_expand_kernel_fixed"] = cpu_triton_utils._expand_kernel_impl is not shipped
        result["probe"] = {"num_calls": probe.num_calls,
                           "num_calls_without_draft_probs": probe.num_calls_without_draft_probs,
                           "samples": probe.samples,
                           "positions": probe.positions}
        runs.append(result)
    tmp = argv[2] + ".tmp"
    with open(tmp, "w") as handle:
        json.dump({"runs": runs}, handle)
    os.replace(tmp, argv[2])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
