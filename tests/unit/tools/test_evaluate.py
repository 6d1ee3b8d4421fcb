"""Speculative decoding in `aerie eval`: exactness at T=0, target distribution at T=1, metrics and reports."""
import json

import pytest
import torch
import transformers

from models.draft.eagle3 import Eagle3LlamaDraft, Eagle3ModelConfig
from tests.helpers import TINY_CHAT
from tools.eval import decode as ev
from tools.eval import report
from tools.eval import run as eval_run

FIXTURE = str(TINY_CHAT)


@pytest.fixture(autouse=True)
def one_thread():
    # batch-1 decoding of tiny models is overhead-bound; extra threads only spin on a shared 2-core machine
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_target(vocab=512, hidden=64, layers=4, seed=0, logit_scale=1.0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=256, eos_token_id=None, bos_token_id=None,
                                      pad_token_id=None)
    model = transformers.LlamaForCausalLM(config).float().eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(logit_scale)
    return model


def draft_for(target, draft_vocab, seed=1, perm=None, aux=(1, 2, 3)):
    c = target.config
    torch.manual_seed(seed)
    config = Eagle3ModelConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=c.hidden_size // 4,
                               rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None,
                               max_position_embeddings=256, vocab_size=c.vocab_size,
                               draft_vocab_size=draft_vocab, target_hidden_size=c.hidden_size,
                               num_aux_layers=3, aux_layer_ids=list(aux))
    draft = Eagle3LlamaDraft(config)
    ids = torch.randperm(c.vocab_size)[:draft_vocab] if perm is None else perm
    t2d = torch.zeros(c.vocab_size, dtype=torch.bool)
    t2d[ids] = True
    draft.set_draft_vocab(ids - torch.arange(draft_vocab), t2d)
    draft.load_embedding(target.get_input_embeddings().weight.detach())
    return draft.eval()


def greedy_reference(target, prompt, max_new_tokens):
    out = target.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                          attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


def test_greedy_speculative_equals_target_greedy():
    target = tiny_target()
    prompt = torch.randint(0, 512, (12,), generator=torch.Generator().manual_seed(5)).tolist()
    expected = greedy_reference(target, prompt, 40)
    # a draft that always proposes the target's most frequent greedy token: accepted often, rejected often
    frequent = max(set(expected), key=expected.count)
    perm = torch.cat([torch.tensor([frequent]), torch.tensor([i for i in range(512) if i != frequent][:63])])
    constant = draft_for(target, 64, perm=perm)
    with torch.no_grad():
        constant.norm.weight.zero_()  # all draft logits 0 -> argmax is draft id 0 -> target id `frequent`
    random_draft = draft_for(target, 64, seed=2)
    perturbed = draft_for(target, 64, seed=2)
    with torch.no_grad():
        for p in perturbed.trainable_parameters():
            p.add_(0.5 * torch.randn_like(p))
    for draft, k in ((random_draft, 3), (perturbed, 4), (constant, 3), (constant, 7)):
        result = ev.SpeculativeDecoder(target, draft).generate(prompt, 40, k)
        assert result.tokens == expected
        assert all(0 <= a <= k for a in result.accepted)
        assert result.num_target_forwards == 1 + len(result.accepted)
    assert sum(result.accepted) > 5  # the constant draft exercised acceptance and cache cropping


def test_eos_stops_generation():
    target = tiny_target(seed=3)
    prompt = [5, 6, 7, 8]
    expected = greedy_reference(target, prompt, 20)
    eos = expected[6]
    result = ev.SpeculativeDecoder(target, draft_for(target, 64)).generate(prompt, 20, 3, eos_token_ids=[eos])
    assert result.tokens == expected[:expected.index(eos) + 1]


def chi_square_p_value(counts, probs):
    expected = probs * counts.sum()
    stat = ((counts - expected) ** 2 / expected).sum()
    df = torch.tensor((len(probs) - 1) / 2, dtype=torch.float64)
    return float(torch.special.gammaincc(df, stat / 2))


@pytest.mark.slow
def test_sampling_follows_the_target_distribution():
    vocab, trials = 8, 2000
    target = tiny_target(vocab=vocab, hidden=32, layers=2, seed=4, logit_scale=25.0)
    draft = draft_for(target, vocab, perm=torch.arange(vocab), aux=(1, 1, 1))
    with torch.no_grad():
        draft.norm.weight.zero_()  # q uniform, far from the peaked target p
    prompt = [1, 2, 3]
    with torch.no_grad():
        p_first = torch.softmax(target(torch.tensor([prompt])).logits[0, -1].double(), -1)
        # marginal of the second generated token (the first one that goes through accept / reject)
        p_second = sum(p_first[a]
                       * torch.softmax(target(torch.tensor([prompt + [a]])).logits[0, -1].double(), -1)
                       for a in range(vocab))
    q_second = torch.full((vocab,), 1.0 / vocab, dtype=torch.float64)
    decoder = ev.SpeculativeDecoder(target, draft)
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(vocab, dtype=torch.float64)
    accepted = 0
    for _ in range(trials):
        result = decoder.generate(prompt, 2, 1, temperature=1.0, generator=generator, verify="exact")
        counts[result.tokens[1]] += 1
        accepted += result.accepted[0]
    assert 0 < accepted < trials  # both accept and reject/resample paths ran
    keep = p_second > 1e-3  # chi-square needs non-vanishing expected counts
    assert counts[~keep].sum() <= 3
    p_kept = p_second[keep] / p_second[keep].sum()
    assert chi_square_p_value(counts[keep], p_kept) > 1e-3
    # the same counts are far from the draft's distribution
    assert chi_square_p_value(counts, q_second) < 1e-6
    assert (p_second - q_second).abs().max() > 0.2


def test_verify_sampled_matches_p_exactly_in_expectation():
    # unit check of the rejection rule: P(first token = x) = p(x) for any q
    p = torch.tensor([[0.6, 0.3, 0.1, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.1, 0.1, 0.4, 0.4]])
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for _ in range(4000):
        drafted = int(torch.multinomial(q[0], 1, generator=generator))
        accepted, nxt = ev.verify_sampled(p, q, [drafted], generator)
        counts[drafted if accepted else nxt] += 1
    assert counts[3] == 0
    assert torch.allclose(counts / counts.sum(), p[0], atol=0.03)


def test_summary_bounds_and_reports(tmp_path):
    results = [ev.DecodeResult(tokens=[1] * 9, accepted=[0, 3, 1], num_target_forwards=4, verify_seconds=0.3,
                               draft_seconds=0.09, num_draft_calls=9),
               ev.DecodeResult(tokens=[1] * 4, accepted=[3], num_target_forwards=2, verify_seconds=0.1,
                               draft_seconds=0.03, num_draft_calls=3)]
    s = report.summarize(results, 3)
    assert s["tau"] == pytest.approx((1 + 4 + 2 + 4) / 4)
    assert s["acceptance_per_position"] == pytest.approx([0.75, 0.5, 0.5])
    assert s["tokens_per_target_forward"] == pytest.approx(13 / 6)
    assert s["estimated_speedup"] == pytest.approx(s["tau"] / (1 + 3 * (0.01 / 0.1)))
    paths = report.write_reports({"prompts": "x", "temperature": 0.0, "results": [s]}, tmp_path / "eval")
    rows = paths["csv"].read_text().splitlines()
    assert rows[0] == "num_speculative_tokens,position,acceptance_rate" and rows[1] == "3,1,0.750000"
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads(paths["summary"].read_text())["results"][0]["tau"] == s["tau"]


def test_prompt_sets(tmp_path):
    mtbench = ev.load_prompts("mtbench")
    assert len(mtbench) == 80 and mtbench[0][0]["role"] == "user" and "Hawaii" in mtbench[0][0]["content"]
    humaneval = ev.load_prompts("humaneval", max_prompts=3)
    assert len(humaneval) == 3 and "def " in humaneval[0][0]["content"]
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "hi"}\n\n{"messages": [{"role": "user", "content": "a"}, '
                    '{"role": "assistant", "content": "b"}]}\n')
    assert ev.load_prompts(str(path)) == [[{"role": "user", "content": "hi"}],
                                          [{"role": "user", "content": "a"}]]
    path.write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match="p.jsonl:1"):
        ev.load_prompts(str(path))
    with pytest.raises(ValueError, match="not mtbench"):
        ev.load_prompts(str(tmp_path / "missing.jsonl"))


@pytest.mark.slow
def test_evaluate_on_the_tiny_chat_target(tmp_path):
    target, tokenizer = ev.load_target_for_eval(type("T", (), {"path": FIXTURE, "dtype": "float32"})())
    prompt = ev.render_prompt(tokenizer, [{"role": "user", "content": "Hello"}])
    assert tokenizer.decode(prompt).rstrip().endswith("assistant")
    c = target.config
    config = Eagle3ModelConfig(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                               num_attention_heads=8, num_key_value_heads=4, head_dim=32, rms_norm_eps=1e-6,
                               rope_theta=10000.0, rope_scaling=None, max_position_embeddings=2048,
                               vocab_size=c.vocab_size, draft_vocab_size=1024,
                               target_hidden_size=c.hidden_size, num_aux_layers=3, aux_layer_ids=[2, 4, 5])
    torch.manual_seed(0)
    draft = Eagle3LlamaDraft(config)
    draft.set_draft_vocab(torch.zeros(1024, dtype=torch.long), torch.arange(c.vocab_size) < 1024)
    draft.load_embedding(target.get_input_embeddings().weight.detach())
    cfg = ev.EvalConfig(draft="random", prompts="mtbench", max_prompts=2, max_new_tokens=12,
                        num_speculative_tokens=[2, 3], temperature=0.0, out_dir=str(tmp_path / "out"))
    summary = ev.evaluate_draft(target, draft, tokenizer, cfg)
    assert [r["num_speculative_tokens"] for r in summary["results"]] == [2, 3]
    for run in summary["results"]:
        k = run["num_speculative_tokens"]
        assert 1.0 <= run["tau"] <= k + 1
        rates = run["acceptance_per_position"]
        assert len(rates) == k and all(0 <= b <= a <= 1 for a, b in zip(rates, rates[1:]))
        assert run["tau"] == pytest.approx(1 + sum(rates))
        assert run["num_prompts"] == 2 and run["estimated_speedup"] > 0
        assert run["oracle_tau"] == k + 1 and run["tau_of_oracle"] == pytest.approx(run["tau"] / (k + 1))
    first = ev.render_prompt(tokenizer, ev.load_prompts("mtbench", 1)[0])
    result = ev.SpeculativeDecoder(target, draft).generate(first, 12, 3,
                                                           eos_token_ids=ev.eos_ids(tokenizer, target))
    assert result.tokens == greedy_reference(target, first, 12)
    assert (tmp_path / "out" / "acceptance.png").is_file() and (tmp_path / "out" / "acceptance.csv").is_file()


@pytest.mark.slow
def test_run_eval_from_composed_config(tmp_path, capsys):
    from omegaconf import OmegaConf

    from models.draft.eagle3 import DraftConfig
    from models.draft.io import save_aerie_draft
    from models.targets.meta import load_target_embedding, target_spec_from_config

    spec = target_spec_from_config({"path": FIXTURE})
    draft = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=512), spec)
    draft.set_draft_vocab(torch.zeros(512, dtype=torch.long), torch.arange(spec.vocab_size) < 512)
    save_aerie_draft(draft, tmp_path / "final")
    cfg = OmegaConf.create({"eval": {**ev.EvalConfig(draft=str(tmp_path / "final"),
                                                      prompts="humaneval", max_prompts=1,
                                                      max_new_tokens=5, num_speculative_tokens=[2],
                                                      temperature=1.0, verify="exact",
                                                      out_dir=str(tmp_path / "eval")).__dict__},
                            "target": {"path": FIXTURE, "dtype": "float32"}})
    summary = eval_run.run_eval(cfg)
    assert json.loads(capsys.readouterr().out)["results"][0]["num_speculative_tokens"] == 2
    assert 1 <= summary["results"][0]["tau"] <= 3 and (tmp_path / "eval" / "summary.json").is_file()
    assert 1 < summary["results"][0]["oracle_tau_target_only"] < summary["results"][0]["oracle_tau"] == 3
    assert load_target_embedding(FIXTURE).shape == (spec.vocab_size, spec.hidden_size)


def test_target_only_verification_is_exact_for_a_deterministic_draft():
    # q = one-hot(x): accept x with p(x), else sample p without x; the first token still follows p
    p = torch.tensor([[0.5, 0.2, 0.3, 0.0], [0.25, 0.25, 0.25, 0.25]])
    q = torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    counts, accepted = torch.zeros(4), 0
    for _ in range(4000):
        num, nxt = ev.verify_sampled(p, q, [2], generator)
        counts[2 if num else nxt] += 1
        accepted += num
    assert counts[3] == 0
    assert torch.allclose(counts / counts.sum(), p[0], atol=0.03)
    assert accepted / 4000 == pytest.approx(0.3, abs=0.03)  # = p(x)


def test_verify_modes_propose_like_vllm():
    target = tiny_target(seed=6)
    draft = draft_for(target, 64, seed=7)
    decoder = ev.SpeculativeDecoder(target, draft)
    logits = torch.randn(64, generator=torch.Generator().manual_seed(1))
    token, q = decoder._propose(logits, 1.0, None, "target_only")
    assert token == int(decoder.draft_ids[logits.argmax()]) and q[token] == 1 and q.sum() == 1
    token, q = decoder._propose(logits, 0.5, torch.Generator().manual_seed(2), "exact")
    assert torch.allclose(q[decoder.draft_ids], torch.softmax(logits / 0.5, -1)) and q[token] > 0
    with pytest.raises(ValueError, match="eval.verify='greedy'"):
        decoder.generate([1, 2, 3], 4, 2, 1.0, torch.Generator(), verify="greedy")


def test_acceptance_stats_from_counts_alone():
    # accepted per step [0, 3, 1, 3]: vLLM's per-position counters are [3, 2, 2] over 4 drafts
    stats = report.acceptance_stats(4, [3, 2, 2], 3, num_prompts=2, num_generated_tokens=13)
    steps = torch.tensor([1.0, 4.0, 2.0, 4.0])
    assert stats["tau"] == pytest.approx(float(steps.mean()))
    assert stats["tau_std"] == pytest.approx(float(steps.std(unbiased=False)))
    assert stats["acceptance_per_position"] == [0.75, 0.5, 0.5]
    assert stats["tokens_per_target_forward"] == pytest.approx(13 / 6)
