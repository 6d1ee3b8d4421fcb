"""`aerie train draft=dflash|eagle3_1` on the tiny target, then each export served by real vLLM: its drafts and
per-position accepted counts at T=0 equal Aerie's own hf decoder run on the exported weights."""
import fcntl
import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_CHAT, TINY_TRAIN_OVERRIDES, read_metrics, run_aerie

pytestmark = pytest.mark.slow
K, MAX_NEW = 3, 24


def _train(tmp_path_factory, data_cache, option, *extra):
    """A short online run of `draft=option` on the session's tokenised data, exported for vLLM in float32."""
    run_dir = tmp_path_factory.mktemp(option) / "run"
    overrides = [o for o in TINY_TRAIN_OVERRIDES if option != "dflash" or not o.startswith("draft.ttt_steps")]
    run_aerie("train", f"draft={option}", f"run_dir={run_dir}", f"data.cache_dir={data_cache}", *overrides,
              "trainer.max_steps=12", *extra)
    run_aerie("export", f"run_dir={run_dir}", "export.format=vllm", "export.dtype=float32")
    return run_dir


@pytest.fixture(scope="module")
def dflash_run(tmp_path_factory, data_cache):
    return _train(tmp_path_factory, data_cache, "dflash", "draft.block_size=4", "draft.num_anchors=16")


@pytest.fixture(scope="module")
def trained(dflash_run, tmp_path_factory, data_cache):
    return {"dflash": dflash_run, "eagle3_1": _train(tmp_path_factory, data_cache, "eagle3_1")}


def test_dflash_trains_and_its_loss_falls(dflash_run):
    from trainer.export import load_draft, load_target_embedding
    from trainer.export_dflash import probe_block_logits

    metrics = read_metrics(dflash_run)
    assert [m["step"] for m in metrics] == list(range(1, 13))
    losses = [m["loss"] for m in metrics]
    assert sum(losses[-4:]) / 4 < 0.95 * sum(losses[:4]) / 4
    assert {"loss_0", "loss_2", "acc_0", "acc_2", "tau_sim"} <= set(metrics[-1])  # block positions 1..3
    config = json.loads((dflash_run / "final" / "config.json").read_text())
    assert config["architecture"] == "dflash" and config["block_size"] == 4
    embed = load_target_embedding(TINY_CHAT).float()
    final, checkpoint = (load_draft(dflash_run / name, embed) for name in ("final", "ckpt/step-12"))
    torch.testing.assert_close(probe_block_logits(checkpoint), probe_block_logits(final))


def _hf_counts(export_dir: Path, prompts, option):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from trainer.evaluate import SpeculativeDecoder
    from trainer.evaluate_dflash import BlockSpeculativeDecoder
    from trainer.export import load_export
    from trainer.export_dflash import from_vllm_files

    target = AutoModelForCausalLM.from_pretrained(TINY_CHAT, dtype=torch.float32).eval()
    embed = target.get_input_embeddings().weight.detach().float()
    if option == "dflash":
        draft = from_vllm_files(json.loads((export_dir / "config.json").read_text()),
                            load_file(str(export_dir / "model.safetensors")),
                            torch.load(export_dir / "mask_embedding.pt"), embed)
        decoder = BlockSpeculativeDecoder(target, draft)
    else:
        decoder = SpeculativeDecoder(target, load_export(export_dir, "vllm", embed))
    results = [decoder.generate(ids, MAX_NEW, K) for ids in prompts]
    accepted = [a for r in results for a in r.accepted]
    return [r.tokens for r in results], len(accepted), [sum(a > i for a in accepted) for i in range(K)]


@pytest.mark.timeout(1200)  # its setup trains the eagle3_1 draft; then two vLLM starts
def test_vllm_serves_each_export_as_aerie_decodes_it(trained):
    from transformers import AutoTokenizer

    from trainer.evaluate import load_prompts, render_prompt
    from trainer.vllm_engine import EngineConfig, run_vllm

    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    prompts = [render_prompt(tokenizer, conv) for conv in load_prompts("mtbench", 4)]
    methods = {"dflash": "dflash", "eagle3_1": "eagle3"}
    exported = json.loads((trained["eagle3_1"] / "export" / "vllm" / "config.json").read_text())
    assert (exported["fc_norm"], exported["norm_output"], exported["norm_before_fc"]) == (True, True, False)
    job = {"target": str(TINY_CHAT), "runs": [
        {"name": option, "prompt_token_ids": prompts, "max_new_tokens": MAX_NEW, "temperature": 0.0, "seed": 0,
         "speculative_config": {"method": methods[option], "model": str(trained[option] / "export" / "vllm"),
                                "num_speculative_tokens": K}} for option in methods]}
    with open(os.environ.get("AERIE_VLLM_LOCK") or os.devnull, "a") as lock:  # one vLLM at a time on shared hosts
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = {run["name"]: run for run in run_vllm(job, EngineConfig(name="vllm", max_model_len=512))["runs"]}
    for option in methods:
        tokens, num_drafts, per_pos = _hf_counts(trained[option] / "export" / "vllm", prompts, option)
        run = result[option]
        assert run["output_token_ids"] == tokens
        assert (run["num_drafts"], run["num_accepted_tokens_per_pos"]) == (num_drafts, per_pos), option
        assert per_pos[0] > 0, option  # trained drafts get accepted
