"""The oracle bound against a brute-force argmax chain decoded token by token without a cache."""
import pytest
import torch

from tools.eval.oracle import chain_accept_probs, chain_tau, oracle_tau


@pytest.fixture(scope="module")
def tiny_target():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8)  # a peaked target, so that the chain's probabilities differ from uniform
    return model


@torch.no_grad()
def brute_force(target, sequence, start, k, temperature):
    context, probs = list(sequence[: start + 1]), []
    for _ in range(k):
        p = torch.softmax(target(input_ids=torch.tensor([context])).logits[0, -1] / temperature, -1)
        probs.append(float(p.max()))
        context.append(int(p.argmax()))
    return probs


@torch.no_grad()
def test_chain_probs_match_token_by_token_decoding(tiny_target):
    sequence = torch.randint(0, 64, (20,), generator=torch.Generator().manual_seed(1)).tolist()
    starts = [5, 9, 10, 18]
    got = chain_accept_probs(tiny_target, sequence, starts, 4, temperature=0.7)
    expected = torch.tensor([brute_force(tiny_target, sequence, s, 4, 0.7) for s in starts])
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_oracle_per_verification(tiny_target):
    prompts, generations = [[1, 2, 3, 4]], [[5, 6, 7, 8, 9, 10]]
    assert oracle_tau(tiny_target, prompts, generations, 3, 0.0, "target_only") == 4.0  # T = 0: always k + 1
    assert oracle_tau(tiny_target, prompts, generations, 3, 1.0, "sampled") == 4.0
    bound = oracle_tau(tiny_target, prompts, generations, 3, 1.0, "target_only")
    probs = chain_accept_probs(tiny_target, prompts[0] + generations[0], list(range(3, 9)), 3, 1.0)
    assert 1.0 < bound < 4.0 and bound == pytest.approx(chain_tau(probs))
    two_starts = torch.tensor([[1.0, 0.5, 0.5], [0.0, 1.0, 1.0]])
    assert chain_tau(two_starts) == pytest.approx((1 + 1 + 0.5 + 0.25 + 1) / 2)
    with pytest.raises(ValueError, match="verification must be one of greedy, sampled, target_only"):
        oracle_tau(tiny_target, prompts, generations, 3, 1.0, "lossy")
