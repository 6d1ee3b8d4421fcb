"""The shared vLLM runner: interpreter resolution, and the real worker serving an eagle3 export of a draft."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers import REPO
from tools.vllm import engine as ve

FIXTURE = str(REPO / "assets" / "tiny-chat-llama")


def test_vllm_python_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("AERIE_VLLM_PYTHON", raising=False)
    with pytest.raises(ValueError, match="engine.python='/no/such/python'"):
        ve.vllm_python("/no/such/python")
    local = REPO / ".venv-vllm" / "bin" / "python"
    if local.is_file():  # an interpreter with vLLM is taken, explicitly or from the environment
        assert ve.vllm_python(str(local)) == str(local)
        monkeypatch.setenv("AERIE_VLLM_PYTHON", str(local))
        assert ve.vllm_python() == str(local)
    if not ve._imports_vllm():  # one without vLLM (Aerie's own) is refused in one line before anything starts
        with pytest.raises(ValueError, match=f"engine.python='{sys.executable}': vllm is not installed "
                                             f"for that interpreter$"):
            ve.vllm_python(sys.executable)
        monkeypatch.setenv("AERIE_VLLM_PYTHON", sys.executable)
        with pytest.raises(ValueError, match="AERIE_VLLM_PYTHON=.*vllm is not installed"):
            ve.vllm_python()
    monkeypatch.setenv("AERIE_VLLM_PYTHON", str(tmp_path))
    with pytest.raises(ValueError, match="AERIE_VLLM_PYTHON="):
        ve.vllm_python()
    monkeypatch.delenv("AERIE_VLLM_PYTHON")
    # a checkout without .venv-vllm, and Aerie's venv has no vllm
    monkeypatch.setattr(ve, "REPO_ROOT", tmp_path)
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
    from models.draft.io import save_aerie_draft
    from models.targets.meta import target_spec_from_config
    from tools.export.base import export

    spec = target_spec_from_config({"path": FIXTURE})
    torch.manual_seed(0)
    draft = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=512), spec)
    draft.set_draft_vocab(torch.zeros(512, dtype=torch.long), torch.arange(spec.vocab_size) < 512)
    save_aerie_draft(draft, tmp_path / "final", metadata={"target": FIXTURE})
    return export(str(tmp_path / "final"), tmp_path / "export" / fmt, fmt, target=FIXTURE)


def corrupt(source: Path, out: Path, config=None, rename=None) -> Path:
    """A copy of an export with config.json edited (config(dict) in place) or one tensor renamed."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(source, out)
    if config:
        raw = json.loads((out / "config.json").read_text())
        config(raw)
        (out / "config.json").write_text(json.dumps(raw))
    if rename:
        tensors = load_file(str(out / "model.safetensors"))
        tensors[rename[1]] = tensors.pop(rename[0])
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_validation_refuses_the_three_corruptions(tmp_path):
    from models.draft.io import load_aerie_draft
    from tools.export.base import validate_export

    out = random_export(tmp_path)
    assert validate_export(out, target=FIXTURE,
                           draft_config=load_aerie_draft(tmp_path / "final").config) == "vllm"
    aux = corrupt(out, tmp_path / "aux",
                  config=lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 3, 6]))
    rope = corrupt(out, tmp_path / "rope", config=lambda c: c.update(rope_theta=100.0))
    renamed = corrupt(out, tmp_path / "renamed",
                      rename=("midlayer.mlp.down_proj.weight", "midlayer.mlp.down.weight"))
    with pytest.raises(ValueError, match=r"aux layer ids \[1, 3, 6\] \(vLLM convention\) differ from the ids "
                                         r"the draft was trained with, \[2, 4, 5\]"):
        validate_export(aux)
    with pytest.raises(ValueError, match="rope_theta 100.0 differs from the draft's trained 10000.0"):
        validate_export(rope)
    with pytest.raises(ValueError, match=r"missing \['midlayer.mlp.down_proj.weight'\], unexpected "
                                         r"\['midlayer.mlp.down.weight'\]"):
        validate_export(renamed)
    # without Aerie's record, the target still catches the theta, and the draft's config the ids
    for path in (aux, rope):
        raw = json.loads((path / "config.json").read_text())
        del raw["aerie"]
        (path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="rope_theta 100.0 != the target's 10000.0"):
        validate_export(rope, target=FIXTURE)
    with pytest.raises(ValueError, match="aux layer ids"):
        validate_export(aux, draft_config=load_aerie_draft(tmp_path / "final").config)


@pytest.mark.slow
def test_worker_serves_an_eagle3_export(tmp_path):
    from transformers import AutoModelForCausalLM

    out = random_export(tmp_path)
    prompts = [[1, 5, 9, 200, 31], [7, 7, 100, 42, 8, 3, 77]]
    k, max_new = 2, 12
    job = {"target": FIXTURE, "runs": [{"name": "eagle3", "prompt_token_ids": prompts,
                                        "max_new_tokens": max_new, "temperature": 0.0, "seed": 0,
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


def eval_cfg(tmp_path, draft, target=FIXTURE, **engine):
    from omegaconf import OmegaConf

    from tools.eval.decode import EvalConfig

    return OmegaConf.create({"eval": {**EvalConfig(draft=str(draft), max_prompts=1, max_new_tokens=4,
                                                   out_dir=str(tmp_path / "eval")).__dict__},
                             "target": {"path": str(target), "dtype": "float32"},
                             "engine": {**ve.EngineConfig(name="vllm").__dict__, **engine}})


def test_eval_engine_vllm_bad_inputs_fail_before_vllm_starts(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from tools.eval.run import run_eval

    with pytest.raises(ValueError, match=f"{tmp_path / 'nowhere'}"):
        run_eval(eval_cfg(tmp_path, tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=f"{tmp_path / 'empty'}: neither an Aerie draft"):
        run_eval(eval_cfg(tmp_path, tmp_path / "empty"))
    out = random_export(tmp_path)
    with pytest.raises(ValueError, match="engine.python='/no/vllm/python'"):
        run_eval(eval_cfg(tmp_path, out, python="/no/vllm/python"))
    if not ve._imports_vllm():  # a machine whose only Python (Aerie's) has no vLLM
        with pytest.raises(ValueError, match=f"^engine.python='{sys.executable}': vllm is not installed"):
            run_eval(eval_cfg(tmp_path, out, python=sys.executable))
    with pytest.raises(ValueError, match="engine.name='sglang'"):
        run_eval(eval_cfg(tmp_path, out, name="sglang"))
    other = tmp_path / "other_target"
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=8,
                                 num_attention_heads=4, num_key_value_heads=2)).save_pretrained(other)
    with pytest.raises(ValueError, match=f"{out}: export does not match target.*target_hidden_size 256 "
                                         f"!= the target's 64; vocab_size 8192 != the target's 512"):
        run_eval(eval_cfg(tmp_path, out, target=other))
    sglang = random_export(tmp_path / "s", "sglang")
    with pytest.raises(ValueError, match="a sglang export; engine=vllm serves vllm exports"):
        run_eval(eval_cfg(tmp_path, sglang))
