"""Tiny random causal LMs saved to disk (Llama, Qwen2, Qwen2-MoE) for the target tests."""
import pytest
import torch


def save_tiny(path, model_type: str, tie: bool = False) -> str:
    import transformers

    common = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=tie, rms_norm_eps=1e-6)
    if model_type == "llama":
        config, cls = transformers.LlamaConfig(**common), transformers.LlamaForCausalLM
    elif model_type == "qwen2":
        config, cls = transformers.Qwen2Config(**common), transformers.Qwen2ForCausalLM
    else:
        config = transformers.Qwen2MoeConfig(**common, moe_intermediate_size=32, shared_expert_intermediate_size=64,
                                             num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1)
        cls = transformers.Qwen2MoeForCausalLM
    torch.manual_seed(0)
    model = cls(config).eval()
    model.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_targets")
    return {name: save_tiny(root / name, name) for name in ("llama", "qwen2", "qwen2_moe")}
