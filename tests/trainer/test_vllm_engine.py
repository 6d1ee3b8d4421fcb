"""The shared vLLM runner: interpreter resolution, and the real worker serving an eagle3 export of a draft."""
import os
import sys
from pathlib import Path

import pytest
import torch

from trainer import vllm_engine as ve

REPO = Path(__file__).resolve().parents[2]
FIXTURE = str(REPO / "assets" / "tiny-chat-llama")


def test_vllm_python_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("AERIE_VLLM_PYTHON", raising=False)
    assert ve.vllm_python(sys.executable) == sys.executable
    with pytest.raises(ValueError, match="engine.python='/no/such/python'"):
        ve.vllm_python("/no/such/python")
    monkeypatch.setenv("AERIE_VLLM_PYTHON", sys.executable)
    assert ve.vllm_python() == sys.executable
    monkeypatch.setenv("AERIE_VLLM_PYTHON", str(tmp_path))
    with pytest.raises(ValueError, match="AERIE_VLLM_PYTHON="):
        ve.vllm_python()
    monkeypatch.delenv("AERIE_VLLM_PYTHON")
    monkeypatch.setattr(ve, "REPO_ROOT", tmp_path)  # a checkout without .venv-vllm, and Aerie's venv has no vllm
    if ve._imports_vllm():
        assert ve.vllm_python() == sys.executable
    else:
        with pytest.raises(ValueError, match="vLLM is not installed.*engine.python"):
            ve.vllm_python()
    (tmp_path / ".venv-vllm" / "bin").mkdir(parents=True)
    os.symlink(sys.executable, tmp_path / ".venv-vllm" / "bin" / "python")
    assert ve.vllm_python() == str(tmp_path / ".venv-vllm" / "bin" / "python")


def test_run_vllm_rejects_an_empty_job():
    with pytest.raises(ValueError, match="at least one run"):
        ve.run_vllm({"target": FIXTURE, "runs": []}, ve.EngineConfig(name="vllm"))


def random_export(tmp_path, fmt="vllm"):
    """A random-weight draft for the tiny target, saved in Aerie's format and exported for `fmt`."""
    from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft
    from trainer.export import export, save_aerie_draft, target_spec_from_config

    spec = target_spec_from_config({"path": FIXTURE})
    torch.manual_seed(0)
    draft = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=512), spec)
    draft.set_draft_vocab(torch.zeros(512, dtype=torch.long), torch.arange(spec.vocab_size) < 512)
    save_aerie_draft(draft, tmp_path / "final", metadata={"target": FIXTURE})
    return export(str(tmp_path / "final"), tmp_path / "export" / fmt, fmt, target=FIXTURE)


@pytest.mark.slow
def test_worker_serves_an_eagle3_export(tmp_path):
    from transformers import AutoModelForCausalLM

    out = random_export(tmp_path)
    prompts = [[1, 5, 9, 200, 31], [7, 7, 100, 42, 8, 3, 77]]
    k, max_new = 2, 12
    job = {"target": FIXTURE, "runs": [{"name": "eagle3", "prompt_token_ids": prompts, "max_new_tokens": max_new,
                                        "temperature": 0.0, "seed": 0,
                                        "speculative_config": {"method": "eagle3", "model": str(out),
                                                               "num_speculative_tokens": k}}]}
    result = ve.run_vllm(job, ve.EngineConfig(name="vllm", max_model_len=256))
    run = result["runs"][0]
    assert run["name"] == "eagle3" and run["generate_seconds"] > 0
    # greedy speculative decoding returns the target's own greedy continuation
    target = AutoModelForCausalLM.from_pretrained(FIXTURE, dtype=torch.float32).eval()
    for ids, tokens in zip(prompts, run["output_token_ids"]):
        reference = target.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                                    attention_mask=torch.ones(1, len(ids), dtype=torch.long))[0, len(ids):]
        assert tokens == reference.tolist()
    assert run["num_generated_tokens"] == sum(len(t) for t in run["output_token_ids"])
    assert run["num_drafts"] > 0 and run["num_draft_tokens"] == k * run["num_drafts"]
    assert len(run["num_accepted_tokens_per_pos"]) == k
    assert sum(run["num_accepted_tokens_per_pos"]) == run["num_accepted_tokens"]
    # every token but the prefill's first comes from a draft step: accepted drafts plus one target token each
    assert run["num_accepted_tokens"] + run["num_drafts"] >= run["num_generated_tokens"] - len(prompts)
