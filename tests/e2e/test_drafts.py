"""`aerie train draft=dflash|eagle3_1` on the tiny target, then every export vLLM loads served by real vLLM in
one worker: the dflash and eagle3_1 `vllm` exports and the eagle3_1 `speculators` export give, at T=0, the
drafts and per-position accepted counts of Aerie's own hf decoder on the exported weights; three corruptions
of the eagle3_1 export (a renamed tensor, wrong aux layer ids, wrong rope_theta) are refused by Aerie's
validation in one line, and vLLM refuses each or serves it at a lower τ.  At T=1, Aerie's
eval.verify=target_only and exact agree with vLLM's draft_sample_method greedy (its default) and probabilistic
within a band from the per-step variance."""
import fcntl
import json
import os
from pathlib import Path

import pytest
import torch

from tests.helpers import TINY_CHAT, TINY_TRAIN_OVERRIDES, read_metrics, run_aerie

pytestmark = pytest.mark.slow
K, MAX_NEW = 3, 24
NUM_T1_PROMPTS, T1_NEW = 24, 32  # T=1 parity: more prompts, for a tight band
# vLLM draft_sample_method -> eval.verify
VERIFY_OF_VLLM = {"greedy": "target_only", "probabilistic": "exact"}


def _train(tmp_path_factory, data_cache, option, *extra, formats=("vllm",)):
    """A short online run of `draft=option` on the session's tokenised data, exported in float32."""
    run_dir = tmp_path_factory.mktemp(option) / "run"
    overrides = [o for o in TINY_TRAIN_OVERRIDES if option != "dflash" or not o.startswith("draft.ttt_steps")]
    run_aerie("train", f"draft={option}", f"run_dir={run_dir}", f"data.cache_dir={data_cache}", *overrides,
              "trainer.max_steps=12", *extra)
    for fmt in formats:
        run_aerie("export", f"run_dir={run_dir}", f"export.format={fmt}", "export.dtype=float32")
    return run_dir


@pytest.fixture(scope="module")
def dflash_run(tmp_path_factory, data_cache):
    return _train(tmp_path_factory, data_cache, "dflash", "draft.block_size=4", "draft.num_anchors=16")


@pytest.fixture(scope="module")
def trained(dflash_run, tmp_path_factory, data_cache):
    return {"dflash": dflash_run,
            "eagle3_1": _train(tmp_path_factory, data_cache, "eagle3_1", formats=("vllm", "speculators"))}


def test_dflash_trains_and_its_loss_falls(dflash_run):
    from models.targets.meta import load_target_embedding
    from tools.export.dflash import probe_block_logits
    from trainer.checkpoint import load_draft

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

    from tools.eval.block import BlockSpeculativeDecoder
    from tools.eval.decode import SpeculativeDecoder
    from tools.export.base import load_export
    from tools.export.dflash import from_vllm_files

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


def _corruptions(export_dir: Path, out: Path) -> dict:
    """The three broken copies of an export: a renamed tensor, wrong aux layer ids, wrong rope_theta."""
    from safetensors import safe_open

    from tests.e2e.test_vllm_engine import corrupt

    with safe_open(str(export_dir / "model.safetensors"), "pt") as handle:
        down = next(name for name in handle.keys() if name.endswith("mlp.down_proj.weight"))
    return {"renamed": corrupt(export_dir, out / "renamed", rename=(down, down.replace("down_proj", "down"))),
            "aux": corrupt(export_dir, out / "aux",
                           config=lambda c: c.update(eagle_aux_hidden_state_layer_ids=[0, 1, 3])),
            "rope": corrupt(export_dir, out / "rope", config=lambda c: c.update(rope_theta=10.0))}


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    """One vLLM worker (lock held while it runs) serving every export and corruption at T=0, k=3, MT-Bench."""
    from transformers import AutoTokenizer

    from data.template import render_prompt
    from tools.eval.decode import load_prompts
    from tools.vllm.engine import EngineConfig, run_vllm

    tokenizer = AutoTokenizer.from_pretrained(TINY_CHAT)
    prompts = [render_prompt(tokenizer, conv) for conv in load_prompts("mtbench", 4)]
    eagle = trained["eagle3_1"] / "export"
    broken = _corruptions(eagle / "vllm", tmp_path_factory.mktemp("corrupt"))
    served_dirs = {"dflash": ("dflash", trained["dflash"] / "export" / "vllm"),
                   "eagle3_1": ("eagle3", eagle / "vllm"), "speculators": ("eagle3", eagle / "speculators"),
                   **{f"corrupt_{name}": ("eagle3", path) for name, path in broken.items()}}
    job = {"target": str(TINY_CHAT), "keep_going": True, "runs": [
        {"name": name, "prompt_token_ids": prompts, "max_new_tokens": MAX_NEW, "temperature": 0.0, "seed": 0,
         "speculative_config": {"method": method, "model": str(path), "num_speculative_tokens": K}}
        for name, (method, path) in served_dirs.items()]}
    t1_prompts = [render_prompt(tokenizer, conv) for conv in load_prompts("mtbench", NUM_T1_PROMPTS)]
    job["runs"] = job["runs"][:3] + [  # before the corruptions: a refusal must not disturb them
        {"name": f"T1_{mode}", "prompt_token_ids": t1_prompts, "max_new_tokens": T1_NEW, "temperature": 1.0,
         "seed": 0, "speculative_config": {"method": "eagle3", "model": str(eagle / "vllm"),
                                           "num_speculative_tokens": K, "draft_sample_method": mode}}
        for mode in VERIFY_OF_VLLM] + job["runs"][3:]
    # one vLLM at a time on shared hosts
    with open(os.environ.get("AERIE_VLLM_LOCK") or os.devnull, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        result = run_vllm(job, EngineConfig(name="vllm", max_model_len=512))
    return {"prompts": prompts, "dirs": {name: path for name, (_, path) in served_dirs.items()},
            "runs": {run["name"]: run for run in result["runs"]}, "fixed": result["cpu_expand_kernel_fixed"]}


# setup: trains eagle3_1, may wait for the vLLM lock, then one start and eight LLMs
@pytest.mark.timeout(2400)
def test_vllm_serves_each_export_as_aerie_decodes_it(served):
    eagle3_1 = served["runs"]["eagle3_1"]
    exported = json.loads((served["dirs"]["eagle3_1"] / "config.json").read_text())
    assert (exported["fc_norm"], exported["norm_output"], exported["norm_before_fc"]) == (True, True, False)
    for option in ("dflash", "eagle3_1"):
        tokens, num_drafts, per_pos = _hf_counts(served["dirs"][option], served["prompts"], option)
        run = served["runs"][option]
        assert "error" not in run, run
        assert run["output_token_ids"] == tokens
        assert (run["num_drafts"], run["num_accepted_tokens_per_pos"]) == (num_drafts, per_pos), option
        assert per_pos[0] > 0, option  # trained drafts get accepted
    # the speculators export holds the same float32 weights under other names: vLLM serves it identically
    speculators = served["runs"]["speculators"]
    assert "error" not in speculators, speculators
    for key in ("output_token_ids", "num_drafts", "num_accepted_tokens_per_pos"):
        assert speculators[key] == eagle3_1[key], key


def test_each_corruption_refused_by_aerie_and_by_vllm_or_in_tau(served):
    """Each corruption is refused by Aerie's validation in one line naming the path; in vLLM the renamed
    tensor is refused or loses τ, and the other two are shown to be read: vLLM hands the draft the states of
    the layers the export names ([0, 1, 3] where the intact export gets [2, 4, 5], also vLLM's default for 8
    layers) and builds the draft's RoPE with the export's theta (10 where the intact export gets 10000), both
    read back from vLLM's own modules.  Their τ need not fall: a 12-step draft is accepted mostly on frequent
    continuations that depend on the token alone (with the head trained from scratch, the earlier default: 11
    of 82 drafts accepted by vLLM for the intact, wrong-aux and wrong-rope exports alike)."""
    from tools.export.base import validate_export

    intact = served["runs"]["eagle3_1"]
    intact_tau = 1 + intact["num_accepted_tokens"] / intact["num_drafts"]
    exported = json.loads((served["dirs"]["eagle3_1"] / "config.json").read_text())
    assert intact["aux_hidden_state_layers"] == exported["eagle_aux_hidden_state_layer_ids"], intact
    for name, match in (("renamed", "missing .*down_proj"), ("aux", r"aux layer ids \[0, 1, 3\]"),
                        ("rope", "rope_theta 10.0 differs")):
        path = served["dirs"][f"corrupt_{name}"]
        with pytest.raises(ValueError, match=match) as refused:
            validate_export(path, target=TINY_CHAT)
        assert str(path) in str(refused.value) and "\n" not in str(refused.value), name
        run = served["runs"][f"corrupt_{name}"]
        if name == "aux":
            assert "error" not in run and run["aux_hidden_state_layers"] == [0, 1, 3], run
            continue
        if name == "rope":  # served with the export's theta where the intact one gets the trained 10000
            assert intact["draft_rope_theta"] == exported["rope_theta"] == 10000.0, intact
            assert "error" not in run and run["draft_rope_theta"] == 10.0, run
            continue
        if "error" in run:  # vLLM refused to load it
            continue
        assert (run["num_drafts"] > 0
                and 1 + run["num_accepted_tokens"] / run["num_drafts"] < intact_tau), (name, run)


@pytest.mark.parametrize("mode", list(VERIFY_OF_VLLM))
def test_t1_acceptance_agrees_with_vllm(served, mode):
    """Aerie's eval.verify (target_only | exact) and vLLM's draft_sample_method (greedy | probabilistic) at
    T=1, k=3, on the same float32 export and NUM_T1_PROMPTS MT-Bench prompts x T1_NEW tokens.  Each engine's τ
    is a mean over its n verify steps of (accepted + 1), with standard deviation s (tau_std, from the
    per-position counts), so the two estimates differ by less than 4·sqrt(s_hf²/n_hf + s_vllm²/n_vllm) unless
    the engines accept differently (4 standard errors: a false alarm about 1 run in 16,000 under the normal
    approximation; steps of one sequence are treated as independent).  The same band, with s² = a(1 - a),
    holds the first position's acceptance a.  vLLM runs with the worker's fix of its CPU temperature expansion
    (without it, the target's logits at draft positions are divided by uninitialised memory:
    tests/e2e/test_vllm_eval.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tools.eval.decode import EvalConfig, evaluate_draft
    from tools.eval.report import summarize_vllm_run
    from tools.export.base import load_export

    target = AutoModelForCausalLM.from_pretrained(TINY_CHAT, dtype=torch.float32).eval()
    draft = load_export(served["dirs"]["eagle3_1"], "vllm",
                        target.get_input_embeddings().weight.detach().float())
    cfg = EvalConfig(draft="", max_prompts=NUM_T1_PROMPTS, max_new_tokens=T1_NEW, num_speculative_tokens=K,
                     temperature=1.0, verify=VERIFY_OF_VLLM[mode])
    hf = evaluate_draft(target, draft, AutoTokenizer.from_pretrained(TINY_CHAT), cfg)["results"][0]
    assert "error" not in served["runs"][f"T1_{mode}"], served["runs"][f"T1_{mode}"]
    vllm = summarize_vllm_run(served["runs"][f"T1_{mode}"], K, float("nan"))
    n_hf, n_vllm = hf["num_verify_steps"], vllm["num_verify_steps"]
    band = 4 * (hf["tau_std"] ** 2 / n_hf + vllm["tau_std"] ** 2 / n_vllm) ** 0.5
    assert abs(hf["tau"] - vllm["tau"]) < band, (hf["tau"], vllm["tau"], band)
    a_hf, a_vllm = hf["acceptance_per_position"][0], vllm["acceptance_per_position"][0]
    band_0 = 4 * (a_hf * (1 - a_hf) / n_hf + a_vllm * (1 - a_vllm) / n_vllm) ** 0.5
    assert abs(a_hf - a_vllm) < band_0, (a_hf, a_vllm, band_0)
    assert a_hf > 0.02, "the test draft must get accepted at T=1 for the comparison to mean anything"


def test_aerie_eval_engine_vllm_serves_dflash(served, dflash_run):
    """`aerie eval engine=vllm` on the DFlash run: Aerie's command finds the export, serves it as `method:
    dflash` and reports vLLM's counters, equal to the worker's run of the same export, prompts, k and T."""
    out = dflash_run / "eval_vllm"
    with open(os.environ.get("AERIE_VLLM_LOCK") or os.devnull, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        run_aerie("eval", f"run_dir={dflash_run}", "engine=vllm", f"eval.out_dir={out}",
                  "eval.max_prompts=4", f"eval.max_new_tokens={MAX_NEW}",
                  f"eval.num_speculative_tokens=[{K}]", "eval.temperature=0", "engine.max_model_len=512")
    summary = json.loads((out / "summary.json").read_text())
    (result,) = summary["results"]
    worker = served["runs"]["dflash"]
    assert summary["engine"] == "vllm" and result["speedup_source"] == "measured"
    assert result["num_accepted_per_position"] == worker["num_accepted_tokens_per_pos"]
    assert result["num_verify_steps"] == worker["num_drafts"] > 0
