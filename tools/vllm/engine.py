"""Run real vLLM in its own process: the `engine` config group and the runner every vLLM caller shares.

vLLM pins its own torch / transformers, so it lives in its own interpreter (`.venv-vllm`, made by `make` on
machines without CUDA; on a GPU machine the user's vLLM: `engine.python=/path/to/python`).  `run_vllm` writes
a job as JSON, runs `tools/vllm/worker.py` (vllm + stdlib only) with that interpreter and returns the worker's
JSON result.

A job: {"target": path, "runs": [{"name", "speculative_config": dict | None, "prompt_token_ids": [[int]],
"max_new_tokens", "temperature", "seed"}], "keep_going": bool (then a run vLLM refuses gives {"name",
"error"})}; a result: {"runs": [{"name", "output_token_ids", "num_drafts", "num_draft_tokens",
"num_accepted_tokens", "num_accepted_tokens_per_pos", "num_generated_tokens", "generate_seconds",
"aux_hidden_state_layers", "draft_rope_theta"}], "cpu_expand_kernel_fixed"}, counters read from vLLM's own
`vllm:spec_decode_*` metrics, one LLM per run; aux_hidden_state_layers: the target layers whose states vLLM
hands the draft (None when it collects none); draft_rope_theta: the RoPE base of the draft vLLM built (None
without a draft).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List

from data.paths import REPO_ROOT

WORKER = Path(__file__).resolve().with_name("worker.py")
ENGINES = ("hf", "vllm")


@dataclass
class EngineConfig:
    name: str = "hf"  # hf (Aerie's in-process decoder) | vllm (real vLLM in its own process)
    python: str = ""  # vLLM's interpreter; "" -> $AERIE_VLLM_PYTHON, <repo>/.venv-vllm/bin/python, this one
    kv_cache_gib: int = 1  # VLLM_CPU_KVCACHE_SPACE (CPU build); GPU builds size the cache themselves
    max_model_len: int = 1024
    dtype: str = "float32"
    timeout_s: float = 1800.0  # for the whole worker (every run of the job)


def engine_config(cfg) -> EngineConfig:
    """EngineConfig of a composed config's `engine` section (the default, hf, when it has none)."""
    from omegaconf import OmegaConf

    if "engine" not in cfg or cfg.engine is None:
        return EngineConfig()
    engine = EngineConfig(**OmegaConf.to_container(cfg.engine, resolve=True))
    check_engine_name(engine.name)
    return engine


class VllmRunError(RuntimeError):
    """vLLM exited non-zero (it refused the model or the draft, or crashed); the message holds its last
    output."""


def check_engine_name(name: str) -> str:
    if name not in ENGINES:
        raise ValueError(f"engine.name={name!r}: not one of {', '.join(ENGINES)}")
    return name


def _imports_vllm() -> bool:
    return importlib.util.find_spec("vllm") is not None


def _finds_vllm(python: str) -> bool:
    """Whether `python` finds the vllm package (without importing it)."""
    probe = "import importlib.util, sys; sys.exit(importlib.util.find_spec('vllm') is None)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def vllm_python(python: str = "") -> str:
    """The interpreter that runs vLLM: explicit path, $AERIE_VLLM_PYTHON, <repo>/.venv-vllm, or this one."""
    for source, path in (("engine.python", python),
                         ("AERIE_VLLM_PYTHON", os.environ.get("AERIE_VLLM_PYTHON", ""))):
        if path:
            if not (Path(path).is_file() and os.access(path, os.X_OK)):
                raise ValueError(f"{source}={path!r}: not an executable Python interpreter")
            if not _finds_vllm(path):
                raise ValueError(f"{source}={path!r}: vllm is not installed for that interpreter")
            return str(path)
    local = REPO_ROOT / ".venv-vllm" / "bin" / "python"
    if local.is_file():
        return str(local)
    if _imports_vllm():
        return sys.executable
    raise ValueError(f"vLLM is not installed: no {local} (run `make engine`) and `vllm` does not import "
                     f"here; set engine.python=/path/to/python of an environment with vLLM")


def _worker_env(engine: EngineConfig) -> dict:
    env = dict(os.environ)
    env["VLLM_CPU_KVCACHE_SPACE"] = str(int(engine.kv_cache_gib))
    env.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # engine core and model in the worker's own process: one interpreter start-up and import per job, not
    # three per LLM (~35 s each on 2 cores).  In-process, vLLM's CPU thread binding cannot lower torch's
    # threads any more, so one unbound thread is set as vLLM's multiprocess mode would (overridable from the
    # environment).
    env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    env.setdefault("OMP_NUM_THREADS", "1")
    for name in ("PYTHONPATH", "PYTHONHOME"):  # the worker imports vllm + stdlib only, from its own env
        env.pop(name, None)
    return env


def run_vllm(job: dict, engine: EngineConfig, worker: Path = WORKER) -> dict:
    """Run the job's runs in vLLM (one LLM each) and return the worker's result (another `worker` script: its
    own job, e.g. tools/vllm/dump_worker.py's)."""
    python = vllm_python(engine.python)
    runs: List[dict] = list(job.get("runs") or [])
    if worker == WORKER and not runs or not job.get("target"):
        raise ValueError("a vLLM job needs a target and at least one run")
    full = {**job, "max_model_len": int(engine.max_model_len), "dtype": engine.dtype}
    with tempfile.TemporaryDirectory(prefix="aerie-vllm-") as tmp:
        job_path, result_path = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job_path.write_text(json.dumps(full))
        try:
            proc = subprocess.run([python, str(worker), str(job_path), str(result_path)],
                                  env=_worker_env(engine), cwd=tmp, capture_output=True, text=True,
                                  timeout=engine.timeout_s)
        except subprocess.TimeoutExpired as err:
            raise VllmRunError(f"vLLM worker ran past engine.timeout_s={engine.timeout_s}: "
                               f"{(err.stderr or b'')[-2000:]!r}") from None
        if proc.returncode != 0 or not result_path.is_file():
            tail = (proc.stdout[-2000:] + "\n" + proc.stderr[-6000:]).strip()
            raise VllmRunError(f"vLLM ({python}) exited {proc.returncode} on target {job['target']}:\n{tail}")
        return json.loads(result_path.read_text())
