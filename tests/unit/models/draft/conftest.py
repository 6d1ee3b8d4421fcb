"""Tiny draft fixtures: a TargetSpec stand-in, a float64 draft and batches (padded or packed)."""
from types import SimpleNamespace

import pytest
import torch

from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft
from models.draft.vocab import build_draft_vocab

VOCAB, HIDDEN, DRAFT_VOCAB = 512, 64, 128


def make_spec(**overrides):
    fields = dict(
        name_or_path="tiny", model_type="llama", architectures=["LlamaForCausalLM"], num_layers=8,
        hidden_size=HIDDEN, intermediate_size=128, vocab_size=VOCAB, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, max_position_embeddings=256,
        aux_layer_ids=[2, 4, 5],
    )
    fields.update(overrides)
    return SimpleNamespace(**fields)


def make_draft(seed=0, spec=None, **draft_overrides):
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
    """Rows packed with documents of the given lengths, right-padded to `length`; random aux/teacher tensors."""
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


@pytest.fixture
def draft_factory():
    return make_draft


@pytest.fixture
def batch_factory():
    return make_batch


@pytest.fixture
def spec_factory():
    return make_spec
