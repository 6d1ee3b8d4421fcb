"""`aerie plan`: component formulas, ZeRO partitioning, setup search, presets, and prediction vs a measured
peak."""
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft
from models.targets.base import TargetSpec
from tests.helpers import REPO, TINY_CHAT, aerie_env
from tools.plan import (
    PRESET_ARCHS,
    TargetArch,
    arch_from_hf_config,
    deepspeed_option,
    draft_sizes,
    plan_memory,
    recommend,
    resolve_arch,
    run_plan,
    smallest_setup,
)
from trainer.engine import DeepSpeedConfig
from trainer.train import TrainerConfig

SMALL = TargetArch(num_layers=4, hidden_size=8, intermediate_size=16, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=4, vocab_size=32, num_params=10_000)


def _spec(arch: TargetArch) -> TargetSpec:
    return TargetSpec("t", "llama", ["LlamaForCausalLM"], arch.num_layers, arch.hidden_size,
                      arch.intermediate_size, arch.vocab_size, arch.num_attention_heads,
                      arch.num_key_value_heads, arch.head_dim, 1e-6, 1e4, None, 128, [2, 2, 1])


def test_component_formulas_on_a_hand_computed_case():
    draft_cfg = DraftConfig(draft_vocab_size=16, ttt_steps=1)
    sizes = draft_sizes(SMALL, draft_cfg, 3)
    # fc 3*8*8 + lm_head 8*16 + norm 8 + q/k/v 16*(8+4+4) + o 8*8 + mlp 3*8*16 + 3 norms of 8
    assert sizes["trainable"] == 192 + 128 + 8 + 256 + 64 + 384 + 24 == 1056
    draft = Eagle3LlamaDraft.from_target(draft_cfg, _spec(SMALL))
    assert sizes["trainable"] == sum(p.numel() for p in draft.trainable_parameters())
    assert sizes["embedding"] == draft.embed_tokens.weight.numel() == 256

    trainer_cfg = TrainerConfig(precision="fp32", max_tokens_per_batch=4)
    plan = plan_memory(SMALL, draft_cfg, trainer_cfg, DeepSpeedConfig(zero_stage=2), 1,
                       target_dtype="float32", device="cpu", overhead_gb=0.0, logits_chunk_size=2)
    c = plan.components
    assert c["target params"] == 10_000 * 4
    assert c["draft weights"] == 1056 * 4 and c["fp32 master"] == 1056 * 4 and c["Adam moments"] == 1056 * 8
    assert c["draft embedding (frozen)"] == 256 * 4 and "embedding copy (trainer data)" not in c
    assert c["reduce bucket"] == 1056 * 4 and c["draft grads"] == 1056 * 4
    # L * (Vd fp32 logits + argmax + 3 aux states of 8 fp32)
    assert c["teacher logits + aux states"] == 4 * (16 * 4 + 8 + 3 * 8 * 4)
    # captured 5 x H, then max(layer: (3H + max(4q + 3kv, 3I)) * 4 + 2H * 4 per token,
    # chunk 2 x (V*4 + H*4)), mask
    layer = (24 + max(4 * 8 + 3 * 4, 48)) * 4 + 64
    assert c["target activations"] == 4 * 5 * 8 * 4 + max(4 * layer, 2 * (32 * 4 + 8 * 4)) + 16 * 5
    resident = sum(v for k, v in c.items() if k not in plan.phases)
    assert plan.total == resident + max(plan.phase_totals().values())
    assert plan.phase_totals()["optimizer step"] == 1056 * 4 + 1056 * 8

    bf16 = plan_memory(SMALL, draft_cfg, TrainerConfig(precision="bf16", max_tokens_per_batch=4),
                       DeepSpeedConfig(zero_stage=2), 1, device="cpu", overhead_gb=0.0)
    assert bf16.components["draft weights"] == 1056 * 2 and bf16.components["fp32 master"] == 1056 * 4
    assert bf16.components["target params"] == 10_000 * 2


def test_zero3_partitions_target_and_optimizer_by_world_size():
    arch = PRESET_ARCHS["meta-llama/Llama-3.3-70B-Instruct"]
    draft_cfg, trainer_cfg = DraftConfig(), TrainerConfig(max_tokens_per_batch=4096)
    zero3, zero2 = DeepSpeedConfig(zero_stage=3), DeepSpeedConfig(zero_stage=2)
    p8, p16 = (plan_memory(arch, draft_cfg, trainer_cfg, zero3, w) for w in (8, 16))
    assert p8.components["target params"] == pytest.approx(arch.num_params * 2 / 8)
    assert p16.components["target params"] == pytest.approx(p8.components["target params"] / 2)
    assert p16.components["Adam moments"] == pytest.approx(p8.components["Adam moments"] / 2)
    assert p16.components["draft weights"] == pytest.approx(p8.components["draft weights"] / 2)
    assert p8.components["target gathered (ZeRO-3)"] == p16.components["target gathered (ZeRO-3)"] > 0
    q8, q16 = (plan_memory(arch, draft_cfg, trainer_cfg, zero2, w) for w in (8, 16))
    assert q8.components["target params"] == q16.components["target params"] == arch.num_params * 2
    assert q16.components["Adam moments"] == pytest.approx(q8.components["Adam moments"] / 2)
    assert q16.components["draft weights"] == q8.components["draft weights"]
    offload = deepspeed_option("zero3_offload", zero2)
    assert offload.zero_stage == 3 and offload.offload_param and offload.offload_optimizer
    off = plan_memory(arch, draft_cfg, trainer_cfg, offload, 8)
    assert off.components["target params"] == 0 and off.components["Adam moments"] == 0
    with pytest.raises(ValueError, match="world_size"):
        plan_memory(arch, draft_cfg, trainer_cfg, zero3, 0)


def test_smallest_setup_needs_more_gpus_for_405b_than_8b():
    draft_cfg, trainer_cfg, ds = DraftConfig(), TrainerConfig(max_tokens_per_batch=4096), DeepSpeedConfig()
    args = (draft_cfg, trainer_cfg, ds, 80.0, 8, 256)
    small = smallest_setup(PRESET_ARCHS["meta-llama/Llama-3.1-8B-Instruct"], *args, mode="online")
    large = smallest_setup(PRESET_ARCHS["meta-llama/Llama-3.1-405B-Instruct"], *args, mode="online")
    assert small.world_size == 8 and small.deepspeed == "zero2" and small.fits(80.0)
    assert large.world_size > small.world_size and large.deepspeed.startswith("zero3")
    assert not plan_memory(PRESET_ARCHS["meta-llama/Llama-3.1-405B-Instruct"], draft_cfg, trainer_cfg,
                           deepspeed_option(large.deepspeed, ds), large.world_size - 8).fits(80.0)
    offline = recommend(PRESET_ARCHS["meta-llama/Llama-3.1-405B-Instruct"], *args, mode="offline")
    assert offline["setups"]["offline"].world_size == 8 and "aerie dump" in offline["recommendation"]
    assert smallest_setup(PRESET_ARCHS["meta-llama/Llama-3.1-8B-Instruct"], draft_cfg,
                          trainer_cfg, ds, 1.0, 8, 64, mode="online") is None


@pytest.mark.parametrize("preset", sorted(p.stem for p in (REPO / "conf" / "target").glob("*.yaml")
                                          if p.stem != "tiny_chat"))
def test_presets_are_tabled_and_valid(preset):
    from models.targets.base import TargetConfig

    data = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "target" / f"{preset}.yaml"))
    TargetConfig(**data)  # unknown keys fail here
    assert data["path"] in PRESET_ARCHS and data["dtype"] == "bfloat16"


@pytest.mark.parametrize("name,make", [
    ("meta-llama/Llama-3.1-8B-Instruct", lambda a: __import__("transformers").LlamaConfig(
        num_hidden_layers=a.num_layers, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads,
        vocab_size=a.vocab_size, tie_word_embeddings=False, architectures=["LlamaForCausalLM"])),
    ("Qwen/Qwen3-235B-A22B", lambda a: __import__("transformers").Qwen3MoeConfig(
        num_hidden_layers=a.num_layers, hidden_size=a.hidden_size, intermediate_size=a.intermediate_size,
        num_attention_heads=a.num_attention_heads, num_key_value_heads=a.num_key_value_heads,
        head_dim=a.head_dim, vocab_size=a.vocab_size, num_experts=a.num_experts,
        num_experts_per_tok=a.num_experts_per_token, moe_intermediate_size=a.moe_intermediate_size,
        tie_word_embeddings=False, architectures=["Qwen3MoeForCausalLM"])),
])
def test_table_matches_a_meta_device_count(name, make):
    tabled = PRESET_ARCHS[name]
    counted = arch_from_hf_config(make(tabled))
    assert counted.num_params == pytest.approx(tabled.num_params, rel=0.002)
    assert counted.max_layer_params == pytest.approx(tabled.layer_params(), rel=0.002)
    assert (counted.num_layers, counted.vocab_size, counted.num_experts) == \
        (tabled.num_layers, tabled.vocab_size, tabled.num_experts)


def test_local_target_is_read_from_its_config(tmp_path):
    arch = resolve_arch(str(TINY_CHAT))
    assert (arch.num_layers, arch.hidden_size, arch.vocab_size, arch.head_dim) == (8, 256, 8192, 32)
    from safetensors import safe_open

    with safe_open(str(TINY_CHAT / "model.safetensors"), framework="pt") as f:
        assert arch.num_params == sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1]
                                      for k in f.keys())
    assert resolve_arch("ignored", str(TINY_CHAT / "config.json")) == arch
    with pytest.raises(ValueError, match="target_config_json"):
        resolve_arch(str(tmp_path / "missing"))


def test_run_plan_prints_table_and_json(capsys, hydra_restore):
    from hydra import compose, initialize_config_dir

    from tools.config import REPO_ROOT, register_configs

    register_configs()
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose("plan", overrides=["target=llama3_70b", "cluster=deepspeed"])
    result = run_plan(cfg)
    out = capsys.readouterr().out
    assert "target params" in out and "TTT activations" in out and "recommendation: online" in out
    assert result["setups"]["online"].world_size == 8
    with initialize_config_dir(str(REPO_ROOT / "conf"), version_base=None):
        cfg = compose("plan", overrides=["target=llama3_70b", "cluster=deepspeed", "plan.json=true",
                                           "plan.mode=offline", "plan.seq_len=2048"])
    run_plan(cfg)
    data = json.loads(capsys.readouterr().out)
    assert set(data["setups"]) == {"dump", "offline"} and data["setups"]["offline"]["world_size"] == 8
    assert data["arch"]["num_layers"] == 80


# The measurement: one process runs the real trainer twice.  A first run on a tiny target (hidden 64) warms up
# everything that does not depend on the model (lazy imports, tokenizer, data cache, process group,
# DeepSpeed); RssAnon after it is the baseline.  The second run on a larger target is sampled every 0.3 ms;
# its peak minus the baseline is the model-dependent memory the planner predicts (device=cpu, no framework
# constant).  The target is stored in bf16 and loaded as float32, so its weights are anonymous memory like a
# GPU copy (an fp32 file would stay a file-backed mmap).  MALLOC_MMAP_THRESHOLD_ makes freed tensors go back
# to the OS at once.
DRIVER = textwrap.dedent('''
    import json, sys, threading, time
    from hydra import compose, initialize_config_dir
    from tools.config import REPO_ROOT, register_configs
    from trainer.train import Trainer

    def rss_anon():
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith("RssAnon:"))

    def run(overrides):
        with initialize_config_dir(str(REPO_ROOT / "conf"), version_base=None):
            Trainer(compose("train", overrides=overrides)).fit()

    register_configs()
    common, small, large = json.loads(sys.argv[1])
    run(common + small)
    import gc; gc.collect()
    baseline = rss_anon(); peak = [baseline]; done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_anon()); time.sleep(0.0003)

    threading.Thread(target=sample, daemon=True).start()
    run(common + large)
    done.set()
    print("MEASURED", json.dumps({"baseline": baseline, "peak": max(peak[0], rss_anon())}))
''')


def _tiny_llama(path: Path, hidden: int, intermediate: int, head_dim: int) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, head_dim=head_dim, vocab_size=8192,
                         max_position_embeddings=2048, eos_token_id=2, pad_token_id=0, bos_token_id=None,
                         tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(TINY_CHAT / name, path / name)
    return path


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_prediction_matches_measured_peak_within_25_percent(tmp_path, data_cache):
    small = _tiny_llama(tmp_path / "small", 64, 128, 8)
    large = _tiny_llama(tmp_path / "large", 1024, 2816, 128)
    common = [f"data.cache_dir={data_cache}", "data.max_samples=16", "data.max_eval_samples=4",
              "data.max_length=1024", "trainer.max_tokens_per_batch=1024", "draft.draft_vocab_size=2048",
              "draft.ttt_steps=3", "trainer.eval_every=0", "logger.progress=false", "trainer.warmup_steps=1",
              "target.dtype=float32", "trainer.precision=fp32"]
    runs = [[f"target.path={small}", f"run_dir={tmp_path / 'run_small'}", "trainer.max_steps=1"],
            [f"target.path={large}", f"run_dir={tmp_path / 'run_large'}", "trainer.max_steps=2"]]
    env = dict(aerie_env(), MALLOC_MMAP_THRESHOLD_="262144")
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps([common] + runs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]
    measured = json.loads(proc.stdout.split("MEASURED", 1)[1])
    measured_bytes = measured["peak"] - measured["baseline"]

    plan = plan_memory(resolve_arch(str(large)), DraftConfig(draft_vocab_size=2048, ttt_steps=3),
                       TrainerConfig(precision="fp32", max_tokens_per_batch=1024), DeepSpeedConfig(), 1,
                       target_dtype="float32", device="cpu", overhead_gb=0.0)
    ratio = measured_bytes / plan.total
    print(f"measured {measured_bytes / 2 ** 20:.0f} MiB, predicted {plan.total / 2 ** 20:.0f} MiB, "
          f"ratio {ratio:.3f}")
    assert 0.75 <= ratio <= 1.25, (measured_bytes, plan.components)
