"""`aerie quickstart` (what `make train` runs), shrunk: train with in-loop speculative eval, eval, export,
summary."""
import json

import pytest

from tests.helpers import TINY_TRAIN_OVERRIDES, read_metrics, run_aerie

pytestmark = pytest.mark.slow


def test_quickstart_end_to_end_then_done(tmp_path, data_cache):
    run_dir = tmp_path / "qs"
    args = ["quickstart", "experiment=quickstart", f"run_dir={run_dir}", f"data.cache_dir={data_cache}",
            *TINY_TRAIN_OVERRIDES, "trainer.max_steps=40", "trainer.lr=2e-3",
            "trainer.max_tokens_per_batch=512", "trainer.ckpt_every=0", "trainer.spec_eval_every=40",
            "trainer.spec_eval_max_prompts=1", "eval.max_prompts=6", "eval.max_new_tokens=32"]
    out = run_aerie(*args).stdout
    assert "Aerie quickstart" in out and "Aerie k=3  tau=" in out and "Aerie k=7  tau=" in out
    summary = json.loads((run_dir / "quickstart_summary.json").read_text())
    assert [r["num_speculative_tokens"] for r in summary["acceptance"]] == [3, 7]
    for r in summary["acceptance"]:
        assert 1.0 <= r["tau"] <= r["num_speculative_tokens"] + 1
    # an untrained draft is never accepted at T=0 on this target (tau 1.00, bench/accept.py); 40 short
    # steps are
    assert summary["acceptance"][0]["tau"] > 1.1
    # the default draft is EAGLE 3.1: exported for vLLM, which serves its switches; SGLang has none
    config = json.loads((run_dir / "export" / "vllm" / "config.json").read_text())
    assert config["architectures"] == ["Eagle3LlamaForCausalLM"]
    assert config["fc_norm"] and config["norm_output"]
    assert list(summary["exports"]) == ["vllm"] and not (run_dir / "export" / "sglang").exists()
    assert (run_dir / "eval" / "acceptance.png").is_file()
    from tools.vllm.engine import vllm_python

    try:
        vllm_python()
    except ValueError:  # no vLLM on this machine: the summary says so and goes on
        assert "vLLM not measured" in out and "vllm_acceptance" not in summary
        assert "tau measured by Aerie's decoder only (vLLM is not installed" in out
    else:  # vLLM measured the (bf16) vllm export itself, with the same prompts, k and T
        assert [r["num_speculative_tokens"] for r in summary["vllm_acceptance"]] == [3, 7]
        assert "tau measured by vLLM serving the vllm export" in out
        assert "vLLM k=3  tau=" in out and "vLLM k=7  tau=" in out
        for r in summary["vllm_acceptance"]:
            assert 1.0 <= r["tau"] <= r["num_speculative_tokens"] + 1 and r["speedup"] > 0
    last = read_metrics(run_dir)[-1]
    assert 1.0 <= last["spec_tau_k3"] <= 4.0 and "spec_accept_k7_6" in last
    again = run_aerie(*args).stdout
    assert "already trained to step 40" in again and "Aerie quickstart" in again
