"""Standalone vLLM hidden-state worker: `python dump_worker.py JOB.json RESULT.json`, run by tools/dump.py.

Imports only vllm, torch, safetensors and the standard library (it runs in vLLM's own environment).  It starts
one LLM on the target with vLLM's hidden-state extraction
(`speculative_config={"method": "extract_hidden_states"}`, `eagle_aux_hidden_state_layer_ids` = the job's
layer ids, vLLM's numbering: the input of layer i, N = the last layer's output before the final norm) and the
KV connector that writes what it cached, runs every prompt for one token, and leaves
``sample-NNNNNN.safetensors`` (``hidden_states`` (T, num_layers, H), ``token_ids`` (T,)) in the job's out_dir,
one per prompt in job order.

On GPU the connector is vLLM's ExampleHiddenStatesConnector.  On the CPU build it cannot run: its write path
creates `torch.cuda.Stream()` / `torch.cuda.Event()` and pinned host memory after start-up, which a CPU-only
torch refuses.  CpuHiddenStatesConnector below is the same connector with that copy done synchronously on the
CPU.
"""
import fcntl
import os
import shutil
import sys
import time

# The engine core must run in its own process: the reader below waits (flock) on lock files the connector
# holds until its write, which in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the runner's default) never comes
# back to.
os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1"

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from vllm.distributed.kv_transfer.kv_connector.v1.example_hidden_states_connector import (  # noqa: E402
    ExampleHiddenStatesConnector,
    extract_from_kv_cache,
)
from worker import run_job_file  # noqa: E402  (tools/vllm/worker.py, beside this script)


class _CopyDone:
    """What get_finished polls in place of a CUDA event: the copy is done when the write returns."""

    def query(self) -> bool:
        return True


class CpuHiddenStatesConnector(ExampleHiddenStatesConnector):
    """ExampleHiddenStatesConnector with a synchronous CPU copy instead of a CUDA copy stream and event."""

    def _submit_async_write(self, pending) -> None:
        if not self._is_tp_rank_zero:
            return
        from safetensors.torch import save_file

        block_ids = torch.tensor(pending.block_ids, dtype=torch.long)
        slots = (torch.arange(self._block_size)[None, :] + block_ids[:, None] * self._block_size).flatten()
        hidden = extract_from_kv_cache(self._kv_cache, slots, pending.token_ids.shape[0]).clone()
        os.makedirs(os.path.dirname(pending.filename), exist_ok=True)
        lock_fd = self._lock_fds.pop(pending.req_id, None)
        try:
            save_file({"hidden_states": hidden, "token_ids": pending.token_ids.clone()}, pending.filename)
        finally:
            if lock_fd is not None:
                os.close(lock_fd)  # releases the reader's wait
        self._req_copy_events[pending.req_id] = _CopyDone()


def connector_config(storage: str) -> dict:
    config = {"kv_connector": "ExampleHiddenStatesConnector", "kv_role": "kv_producer",
              "kv_connector_extra_config": {"shared_storage_path": storage}}
    if not torch.cuda.is_available():
        # the engine process imports this module by name: put its folder on the path it inherits
        here = os.path.dirname(os.path.abspath(__file__))
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        config.update(kv_connector="CpuHiddenStatesConnector", kv_connector_module_path="dump_worker")
    return config


def run(job: dict) -> dict:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    out_dir = job["out_dir"]
    storage = os.path.join(out_dir, "connector")
    llm = LLM(model=job["target"], dtype=job.get("dtype", "float32"), enforce_eager=True,
              max_model_len=int(job["max_model_len"]), enable_prefix_caching=False,
              speculative_config={"method": "extract_hidden_states", "num_speculative_tokens": 1,
                                  "draft_model_config": {"hf_config": {
                                      "eagle_aux_hidden_state_layer_ids": list(job["layer_ids"])}}},
              kv_transfer_config=connector_config(storage))
    prompts = [TokensPrompt(prompt_token_ids=list(ids)) for ids in job["prompt_token_ids"]]
    start = time.perf_counter()
    outputs = llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)
    files = []
    for i, (ids, output) in enumerate(zip(job["prompt_token_ids"], outputs)):
        path = output.kv_transfer_params["hidden_states_path"]
        with open(path + ".lock") as lock:
            fcntl.flock(lock, fcntl.LOCK_SH)  # the connector holds LOCK_EX until the file is written
        tensors = load_file(path)
        if tensors["token_ids"].tolist() != list(ids):
            raise RuntimeError(f"prompt {i}: vLLM saved the hidden states of other tokens")
        files.append(os.path.join(out_dir, f"sample-{i:06d}.safetensors"))
        shutil.move(path, files[-1])
        os.remove(path + ".lock")
    return {"files": files, "seconds": time.perf_counter() - start}


if __name__ == "__main__":
    sys.exit(run_job_file(sys.argv, run))
