"""Shared test helpers (plain functions and constants; fixtures live in the conftest.py files): the repository
paths, the real `aerie` CLI runner, tiny targets and drafts, and readers of run outputs."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
TINY_CHAT = REPO / "assets" / "tiny-chat-llama"

# Small enough for 2 CPU cores: a few conversations, short rows, a 3-step TTT unroll.
TINY_TRAIN_OVERRIDES = [
    "data.max_samples=48", "data.max_eval_samples=8", "data.max_length=192",
    "trainer.max_tokens_per_batch=256", "draft.draft_vocab_size=1024", "draft.ttt_steps=3",
    "trainer.warmup_steps=2", "trainer.lr=1e-3", "trainer.eval_every=0", "logger.progress=false",
]


def aerie_env() -> dict:
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "2")
    env.pop("WANDB_API_KEY", None)
    return env


def run_aerie(*args, cwd=None, timeout=900, check=True, launcher=None):
    """Run the real `aerie` console script (optionally under the deepspeed launcher) and return the
    process."""
    if launcher is None:
        cmd = [str(Path(sys.executable).parent / "aerie"), *args]
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), *launcher, "--module", "tools.cli", *args]
    proc = subprocess.run(cmd, cwd=cwd or REPO, env=aerie_env(), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir) -> list:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- the reliability runs: one tiny finished run that the fault tests copy and damage ----
BASE_STEPS = 4


def train_args(run_dir, cache, *extra):
    return ["train", f"run_dir={run_dir}", f"data.cache_dir={cache}", *TINY_TRAIN_OVERRIDES,
            f"trainer.max_steps={BASE_STEPS}", "trainer.ckpt_every=2", "trainer.keep_last=5", *extra]


# ---- tiny random causal LMs saved to disk (Llama, Qwen2, Qwen2-MoE) ----
def save_tiny(path, model_type: str, tie: bool = False) -> str:
    import transformers

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  tie_word_embeddings=tie, rms_norm_eps=1e-6)
    if model_type == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif model_type == "qwen2":
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        config = transformers.Qwen2MoeConfig(**common, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=64, num_experts=4,
                                             num_experts_per_tok=2, decoder_sparse_step=1)
        cls = transformers.Qwen2MoeForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    model.save_pretrained(str(path))
    return str(path)


# ---- tiny drafts: a TargetSpec stand-in, a float64 draft and batches (padded or packed) ----
VOCAB, HIDDEN, DRAFT_VOCAB = 512, 64, 128


def make_spec(**overrides):
    fields = dict(
        name_or_path="tiny", model_type="llama", architectures=["LlamaForCausalLM"], num_layers=8,
        hidden_size=HIDDEN, intermediate_size=128, vocab_size=VOCAB, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
        max_position_embeddings=256, aux_layer_ids=[2, 4, 5],
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def make_draft(seed=0, spec=None, **draft_overrides):
    from data.vocab import build_draft_vocab
    from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft

    torch.manual_seed(seed)
    cfg = DraftConfig(draft_vocab_size=DRAFT_VOCAB, **draft_overrides)
    draft = Eagle3LlamaDraft.from_target(cfg, spec or make_spec()).double()
    draft.load_embedding(torch.randn(VOCAB, HIDDEN, dtype=torch.float64))
    counts = torch.randint(0, 1000, (VOCAB,))
    draft.set_draft_vocab(*build_draft_vocab(counts, DRAFT_VOCAB))
    # non-trivial norms so that a wrong norm placement shows
    with torch.no_grad():
        for name, p in draft.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    return draft


def make_batch(doc_lengths_per_row, length, seed=0, num_aux=3):
    """Rows packed with documents of the given lengths, right-padded to `length`; random aux/teacher
    tensors."""
    g = torch.Generator().manual_seed(seed)
    batch = len(doc_lengths_per_row)
    document_ids = torch.full((batch, length), -1)
    position_ids = torch.zeros(batch, length, dtype=torch.long)
    for row, doc_lengths in enumerate(doc_lengths_per_row):
        start = 0
        for doc, n in enumerate(doc_lengths):
            document_ids[row, start : start + n] = doc
            position_ids[row, start : start + n] = torch.arange(n)
            start += n
    valid = document_ids >= 0
    return dict(
        input_ids=torch.randint(0, VOCAB, (batch, length), generator=g) * valid,
        aux_hidden_states=torch.randn(batch, length, num_aux * HIDDEN, generator=g, dtype=torch.float64),
        teacher_logits=3 * torch.randn(batch, length, DRAFT_VOCAB, generator=g, dtype=torch.float64),
        teacher_argmax=torch.randint(0, VOCAB, (batch, length), generator=g),
        loss_mask=(torch.rand(batch, length, generator=g) < 0.8).long() * valid,
        position_ids=position_ids,
        document_ids=document_ids,
    )


# ---- vocabulary counting: 4 rows whose loss-masked counts are known ----
VOCAB_ROWS = {"input_ids": [[1, 2, 3, 3], [3, 4, 4, 0], [5, 5], [2]],
              "loss_mask": [[0, 1, 1, 1], [0, 1, 1, 0], [0, 0], [1]]}


# ---- regeneration outputs ----
def read_output(out_dir):
    from data.sources import DataConfig, load_conversations

    records, report = load_conversations(DataConfig(source="openai", path=str(out_dir)))
    assert not report.counts
    return records


def settled_ids(out_dir):
    """Ids in the output's shards and journals (a shard and its journal coexist for a moment: a set)."""
    ids = set()
    for path in out_dir.glob("regen-*"):
        for line in open(path):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # being written
            ids.add((entry.get("record") or entry.get("rejected") or entry)["id"])
    return ids


def end_process_group() -> None:
    """Destroy this process's default group and DeepSpeed's cached groups over it, so that a later test's
    DeepSpeed engine (in the same pytest process) builds its groups over that test's own process group."""
    import importlib

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    if "deepspeed.utils.groups" in sys.modules:
        importlib.reload(sys.modules["deepspeed.utils.groups"])
