"""Block drafting in `aerie eval` (engine=hf): greedy block speculative decoding returns the target's greedy
continuation, rounds and context bookkeeping match, and evaluate_draft dispatches DFlash drafts to it."""
from types import SimpleNamespace

import torch
import transformers

from models.draft.dflash import DFlashConfig, DFlashDraft
from tests.helpers import TINY_CHAT
from tools.eval import decode as ev
from tools.eval.block import BlockSpeculativeDecoder


def tiny_target(vocab=256):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, eos_token_id=None, bos_token_id=None,
                                      pad_token_id=None)
    return transformers.LlamaForCausalLM(config).float().eval()


def dflash_for(target, seed=1, block_size=5):
    c = target.config
    spec = SimpleNamespace(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                           vocab_size=c.vocab_size, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                           rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                           max_position_embeddings=256, aux_layer_ids=[1, 2, 3])
    torch.manual_seed(seed)
    draft = DFlashDraft.from_target(DFlashConfig(draft_vocab_size=64, block_size=block_size), spec)
    ids = torch.randperm(c.vocab_size)[:64].sort().values
    t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    draft.set_draft_vocab(ids - torch.arange(64), t2d)
    draft.load_embedding(target.get_input_embeddings().weight.detach())
    return draft.eval()


def test_block_speculative_decoding_equals_target_greedy():
    target = tiny_target()
    prompt = torch.randint(0, 256, (10,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = target.generate(
        torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
        attention_mask=torch.ones(1, len(prompt), dtype=torch.long))[0, len(prompt):].tolist()
    frequent = max(set(expected), key=expected.count)
    constant = dflash_for(target)
    with torch.no_grad():  # every drafted slot proposes `frequent`: accepted sometimes, rejected often
        constant.norm.weight.zero_()
        constant.d2t[0] = frequent
    for draft, k in ((dflash_for(target, seed=2), 4), (constant, 2), (constant, 4)):
        result = BlockSpeculativeDecoder(target, draft).generate(prompt, 24, k)
        assert result.tokens == expected
        assert all(0 <= a <= k for a in result.accepted)
        assert result.num_target_forwards == 1 + len(result.accepted) == 1 + result.num_draft_calls
    assert sum(result.accepted) > 3


def test_evaluate_draft_runs_block_drafts(tmp_path):
    """A DFlash draft goes through evaluate_draft end to end (the chain decoder would call draft.extend, which
    a block drafter does not have)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(TINY_CHAT)
    target = tiny_target(vocab=len(tokenizer))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "Name three colours."}\n{"prompt": "Why is the sky blue?"}\n')
    summary = ev.evaluate_draft(target, dflash_for(target), tokenizer,
                                ev.EvalConfig(prompts=str(prompts), max_new_tokens=8,
                                              num_speculative_tokens=[2, 4]))
    assert [r["num_speculative_tokens"] for r in summary["results"]] == [2, 4]
    assert all(r["num_prompts"] == 2 and r["num_verify_steps"] > 0 for r in summary["results"])
