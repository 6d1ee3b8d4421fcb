"""Loss masks token by token for Llama-3-, ChatML- and Gemma-style templates (diff method) and
{% generation %}."""
import copy

import pytest

from data.template import has_generation_tags, tokenize_conversation

LLAMA3 = ("<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
          "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
          "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
GEMMA = ("<bos>{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
         "<start_of_turn>{{ role }}\n{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
         "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
CHATML_GENERATION = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
                     "{% generation %}{{ m['content'] }}<|im_end|>{% endgeneration %}{{ '\\n' }}"
                     "{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
                     "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "It is 4, of course."},
            {"role": "user", "content": "And 3+3?"},
            {"role": "assistant", "content": "Six.\nDone!"}]


def pieces_llama3(messages):
    out = [("<|begin_of_text|>", 0)]
    for m in messages:
        out.append((f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n", 0))
        out.append((m["content"] + "<|eot_id|>", m["role"] == "assistant"))
    return out


def pieces_chatml(messages):
    out = []
    for m in messages:
        out.append((f"<|im_start|>{m['role']}\n", 0))
        out.append((m["content"] + "<|im_end|>", m["role"] == "assistant"))
        out.append(("\n", 0))
    return out


def pieces_gemma(messages):
    out = [("<bos>", 0)]
    for m in messages:
        out.append((f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n", 0))
        out.append((m["content"] + "<end_of_turn>", m["role"] == "assistant"))
        out.append(("\n", 0))
    return out


def with_template(tokenizer, template, special):
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(special, special_tokens=True)
    tok.chat_template = template
    return tok


def expected(tok, pieces):
    """Tokens of the concatenated pieces; mask 1 on tokens inside assistant pieces (none may straddle one)."""
    text = "".join(p for p, _ in pieces)
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    spans, pos = [], 0
    for piece, trained in pieces:
        if trained:
            spans.append((pos, pos + len(piece)))
        pos += len(piece)
    mask = []
    for a, b in enc["offset_mapping"]:
        inside = any(s <= a and b <= e for s, e in spans)
        assert inside or not any(a < e and s < b for s, e in spans), "token straddles an assistant piece"
        mask.append(int(inside))
    return enc["input_ids"], mask


@pytest.mark.parametrize("name", ["llama3", "chatml", "gemma"])
def test_diff_mask_token_by_token(tokenizer, name):
    if name == "llama3":
        tok = with_template(tokenizer, LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>",
                                                "<|end_header_id|>", "<|eot_id|>"])
        messages, pieces = MESSAGES, pieces_llama3(MESSAGES)
    elif name == "chatml":
        tok = tokenizer  # the fixture's own template
        messages, pieces = MESSAGES, pieces_chatml(MESSAGES)
    else:
        tok = with_template(tokenizer, GEMMA, ["<bos>", "<start_of_turn>", "<end_of_turn>"])
        messages, pieces = MESSAGES[1:], pieces_gemma(MESSAGES[1:])
    assert not has_generation_tags(tok)
    out = tokenize_conversation(tok, messages, max_length=4096)
    ids, mask = expected(tok, pieces)
    assert out["input_ids"] == ids
    assert out["loss_mask"] == mask
    trained = tok.decode([t for t, m in zip(ids, mask) if m])
    assert "It is 4" in trained and "Six." in trained and "2+2" not in trained and "terse" not in trained
    cut = tokenize_conversation(tok, messages, max_length=10)
    assert cut == {"input_ids": ids[:10], "loss_mask": mask[:10]}


def test_generation_tags_agree_with_diff(tokenizer):
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = CHATML_GENERATION
    assert has_generation_tags(tok)
    by_tags = tokenize_conversation(tok, MESSAGES, max_length=4096)
    by_diff = tokenize_conversation(tok, MESSAGES, max_length=4096, mask_method="diff")
    assert by_tags == by_diff
    assert by_tags["input_ids"] == expected(tok, pieces_chatml(MESSAGES))[0]
    with pytest.raises(ValueError, match="no {% generation %}"):
        tokenize_conversation(tokenizer, MESSAGES, max_length=64, mask_method="generation")


def test_system_prompt_and_template_kwargs(tokenizer):
    plain = tokenize_conversation(tokenizer, MESSAGES[1:], max_length=4096)
    assert "system" not in tokenizer.decode(plain["input_ids"])  # nothing injected by default
    with_system = tokenize_conversation(tokenizer, MESSAGES[1:], max_length=4096, system_prompt="Be brief.")
    assert tokenizer.decode(with_system["input_ids"]).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    assert sum(with_system["loss_mask"]) == sum(plain["loss_mask"])
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = ("{% if enable_thinking %}<|im_start|>think<|im_end|>\n{% endif %}"
                         + tokenizer.chat_template)
    on = tokenize_conversation(tok, MESSAGES[1:], 4096, chat_template_kwargs={"enable_thinking": True})
    off = tokenize_conversation(tok, MESSAGES[1:], 4096, chat_template_kwargs={"enable_thinking": False})
    assert tok.decode(on["input_ids"]).startswith("<|im_start|>think") and off == plain
    assert sum(on["loss_mask"]) == sum(plain["loss_mask"])
