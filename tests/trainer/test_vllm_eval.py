"""Real vLLM in the loop: a draft trained 40 steps on the tiny target (with vLLM-measured in-loop tau), served by
vLLM from every export it loads, measured by vLLM's counters and compared with Aerie's in-process decoder.

One training run, one vLLM worker for the served runs (one LLM per run inside it), one `aerie eval engine=vllm`.
The HF side uses the export's weights (bf16, computed in fp32), as vLLM does with dtype=float32.
"""
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import TINY_TRAIN_OVERRIDES, read_metrics, run_aerie
from tests.trainer.test_vllm_engine import corrupt
from trainer import evaluate as ev
from trainer.export import export, load_export, load_target_embedding, validate_export
from trainer.vllm_engine import EngineConfig, VllmRunError, run_vllm

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
FIXTURE = str(REPO / "assets" / "tiny-chat-llama")
NUM_PROMPTS, NEW_TOKENS, K = 16, 48, 3
ENGINE = EngineConfig(name="vllm", max_model_len=1024)
EVAL = dict(prompts="mtbench", max_prompts=NUM_PROMPTS, max_new_tokens=NEW_TOKENS, num_speculative_tokens=[K])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_cache):
    run_dir = tmp_path_factory.mktemp("vllm_run") / "run"
    run_aerie("train", f"run_dir={run_dir}", f"data.cache_dir={data_cache}", *TINY_TRAIN_OVERRIDES,
              "trainer.max_steps=40", "trainer.lr=2e-3", "trainer.max_tokens_per_batch=512", "trainer.ckpt_every=0",
              "trainer.spec_eval_every=40", "trainer.spec_eval_max_prompts=2", "trainer.spec_eval_engine=vllm",
              "eval.num_speculative_tokens=[3]", "eval.max_new_tokens=16", "engine=vllm")
    return run_dir


@pytest.fixture(scope="module")
def exports(run_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    out = {fmt: export(str(run_dir / "final"), root / fmt, fmt, target=FIXTURE) for fmt in ("vllm", "speculators")}
    out["aux_ids"] = corrupt(out["vllm"], root / "aux_ids",
                             config=lambda c: c.update(eagle_aux_hidden_state_layer_ids=[1, 3, 6]))
    out["rope_theta"] = corrupt(out["vllm"], root / "rope_theta", config=lambda c: c.update(rope_theta=100.0))
    out["renamed"] = corrupt(out["vllm"], root / "renamed",
                             rename=("midlayer.mlp.down_proj.weight", "midlayer.mlp.down.weight"))
    return out


@pytest.fixture(scope="module")
def prompts():
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURE)
    return [ev.render_prompt(tokenizer, conv) for conv in ev.load_prompts("mtbench", NUM_PROMPTS)]


@pytest.fixture(scope="module")
def served(exports, prompts):
    """vLLM's results by run name: both export formats at T=0, both draft sampling modes at T=1, corruptions."""
    def run(name, model, temperature=0.0, **options):
        return {"name": name, "prompt_token_ids": prompts, "max_new_tokens": NEW_TOKENS, "temperature": temperature,
                "seed": 0, "speculative_config": {"method": "eagle3", "model": str(model),
                                                  "num_speculative_tokens": K, **options}}

    runs = [run("vllm", exports["vllm"]), run("speculators", exports["speculators"]),
            run("t1_greedy", exports["vllm"], 1.0), run("t1_probabilistic", exports["vllm"], 1.0,
                                                         draft_sample_method="probabilistic"),
            run("aux_ids", exports["aux_ids"]), run("rope_theta", exports["rope_theta"])]
    result = run_vllm({"target": FIXTURE, "runs": runs}, ENGINE)
    return {r["name"]: r for r in result["runs"]}


@pytest.fixture(scope="module")
def hf(exports):
    """Aerie's in-process decoder on the export's weights: T=0, and T=1 in both verification modes."""
    target, tokenizer = ev.load_target_for_eval(type("T", (), {"path": FIXTURE, "dtype": "float32"})())
    draft = load_export(exports["vllm"], "vllm", embed_weight=load_target_embedding(FIXTURE).float())
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return {name: ev.evaluate_draft(target, draft, tokenizer, ev.EvalConfig(**EVAL, **cfg))["results"][0]
                for name, cfg in (("t0", {}), ("t1_target_only", {"temperature": 1.0}),
                                  ("t1_exact", {"temperature": 1.0, "verify": "exact"}))}
    finally:
        torch.set_num_threads(threads)


def vllm_stats(run):
    return ev.summarize_vllm_run(run, K, float("nan"))


def band(a: dict, b: dict) -> float:
    """4 standard errors of a tau difference: per-step variance of (accepted + 1) over the verify steps of each
    side, steps taken as independent."""
    return 4 * math.sqrt(a["tau_std"] ** 2 / a["num_verify_steps"] + b["tau_std"] ** 2 / b["num_verify_steps"])


def test_in_loop_tau_is_measured_by_vllm(run_dir):
    last = read_metrics(run_dir)[-1]
    assert last["step"] == 40 and 1.0 <= last["spec_tau_k3"] <= 4.0 and "spec_accept_k3_2" in last
    assert json.loads((run_dir / "spec_eval" / "vllm" / "config.json").read_text())["architectures"] == \
        ["Eagle3LlamaForCausalLM"]


def test_t0_parity_with_vllm_counts(served, hf):
    vllm = vllm_stats(served["vllm"])
    assert vllm["tau"] > 1.1  # a trained draft: parity is not about all-rejected chains
    assert vllm["num_verify_steps"] == hf["t0"]["num_verify_steps"]
    assert vllm["num_accepted_per_position"] == hf["t0"]["num_accepted_per_position"]
    assert vllm["num_generated_tokens"] == hf["t0"]["num_generated_tokens"]


def test_speculators_export_is_served_like_the_vllm_export(served):
    for key in ("num_drafts", "num_accepted_tokens_per_pos", "output_token_ids"):
        assert served["speculators"][key] == served["vllm"][key]


def test_t1_target_only_matches_vllm_default(served, hf):
    vllm, aerie = vllm_stats(served["t1_greedy"]), hf["t1_target_only"]
    assert abs(vllm["tau"] - aerie["tau"]) <= band(vllm, aerie), (vllm["tau"], aerie["tau"], band(vllm, aerie))


def test_corrupt_exports_are_refused_before_vllm_and_hurt_in_vllm(exports, served, run_dir):
    from trainer.export import load_aerie_draft

    trained = load_aerie_draft(run_dir / "final").config
    for name, message in (("aux_ids", "aux layer ids"), ("rope_theta", "rope_theta"), ("renamed", "missing ")):
        with pytest.raises(ValueError, match=message):
            validate_export(exports[name], target=FIXTURE)
    validate_export(exports["vllm"], target=FIXTURE, draft_config=trained)
    # vLLM itself serves the edited configs without a word, at a lower acceptance
    clean = vllm_stats(served["vllm"])["tau"]
    for name in ("aux_ids", "rope_theta"):
        assert vllm_stats(served[name])["tau"] < clean - 0.05, (name, vllm_stats(served[name])["tau"], clean)
    # ... and refuses a renamed tensor
    job = {"target": FIXTURE, "runs": [{"name": "renamed", "prompt_token_ids": [[1, 2, 3]], "max_new_tokens": 2,
                                        "temperature": 0.0, "seed": 0,
                                        "speculative_config": {"method": "eagle3", "model": str(exports["renamed"]),
                                                               "num_speculative_tokens": K}}]}
    with pytest.raises(VllmRunError, match="down"):
        run_vllm(job, ENGINE)


def test_aerie_eval_engine_vllm_exports_first(run_dir):
    export_dir = run_dir / "export" / "vllm"
    shutil.rmtree(export_dir, ignore_errors=True)
    out = run_dir / "eval_vllm"
    proc = run_aerie("eval", f"run_dir={run_dir}", "engine=vllm", "eval.max_prompts=2", "eval.max_new_tokens=16",
                     "eval.num_speculative_tokens=[2]", f"eval.out_dir={out}")
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(proc.stdout[proc.stdout.index("{"):])["engine"] == "vllm"
    assert summary["engine"] == "vllm" and Path(summary["export"]).resolve() == export_dir.resolve()
    assert (export_dir / "config.json").is_file() and (out / "acceptance.png").is_file()
    run = summary["results"][0]
    assert run["num_speculative_tokens"] == 2 and 1.0 <= run["tau"] <= 3.0 and len(run["acceptance_per_position"]) == 2
    assert run["speedup_source"] == "measured" and run["speedup"] > 0 and run["tokens_per_second"] > 0
    assert (out / "acceptance.csv").read_text().splitlines()[1].startswith("2,1,")


# vLLM's rejection sampler on a case small enough to compute by hand: one draft token over a 4-token vocabulary.
# p = target, q = draft.  Exact speculative sampling accepts with sum_x min(p, q) = 0.1 + 0.1 + 0.1 + 0 = 0.30; a
# sampler that is not given q (draft_probs=None, as for a deterministic draft) accepts x ~ q with p(x):
# sum_x q p = 0.06 + 0.03 + 0.04 = 0.13.  Both keep the output distributed as p.
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

    from trainer.vllm_engine import vllm_python

    proc = subprocess.run([vllm_python(), "-c", REJECTION_CASE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # 20,000 draws: one standard error of a rate is <= 0.0035
    assert out["q"]["accepted"] == pytest.approx(0.30, abs=0.015)
    assert out["none"]["accepted"] == pytest.approx(0.13, abs=0.015)
    for name in ("q", "none"):
        assert out[name]["first"] == pytest.approx([0.6, 0.3, 0.1, 0.0], abs=0.015)
