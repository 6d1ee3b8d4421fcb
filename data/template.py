"""Chat templating with an assistant-token loss mask taken from the tokenizer's own chat template.

Two mask methods, both driven by the template (no per-model regex):
- "generation": templates with ``{% generation %}`` blocks -> ``return_assistant_tokens_mask``.
- "diff": for each assistant turn, render the prefix up to the generation prompt and the prefix including the
  turn; the text where they differ from the full rendering bounds the assistant's tokens (mapped through the
  tokenizer's offsets, cut after the first end-of-turn token).
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional

GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def has_generation_tags(tokenizer, chat_template: Optional[str] = None) -> bool:
    template = chat_template or tokenizer.chat_template
    if isinstance(template, dict):
        template = template.get("default", "")
    return bool(template) and bool(GENERATION_TAG.search(template))


def end_of_turn_ids(tokenizer) -> set:
    """Ids the model emits to stop: eos plus any `<|eot_id|>` / `<end_of_turn>`-style token of the
    vocabulary."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    for tok in ("<|eot_id|>", "<end_of_turn>", "<|im_end|>", "<|end|>"):
        tid = tokenizer.convert_tokens_to_ids(tok)
        if (isinstance(tid, int) and tid != tokenizer.unk_token_id
                and tokenizer.convert_ids_to_tokens(tid) == tok):
            ids.add(tid)
    return ids


def _render(tokenizer, messages: List[dict], add_generation_prompt: bool, kwargs: dict) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt, **kwargs)


def _common_prefix(a, b) -> int:
    """Length of the common prefix of two strings or lists (bisection on C-speed slice compares)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi:  # invariant: a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def diff_assistant_mask(tokenizer, messages: List[dict], kwargs: dict, max_length: Optional[int] = None
                        ) -> Dict[str, List[int]]:
    """Template-agnostic mask: text spans where rendering with a turn differs from rendering up to its
    prompt."""
    full = _render(tokenizer, messages, False, kwargs)
    enc = None
    if max_length and len(full) > 8 * max_length:  # tokenise a long head only; the margin absorbs a cut-off
                                                   # word
        enc = tokenizer(full[: 8 * max_length], add_special_tokens=False, return_offsets_mapping=True)
        if len(enc["input_ids"]) < max_length + 16:
            enc = None
    if enc is None:
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    input_ids, offsets = enc["input_ids"], enc["offset_mapping"]
    limit = offsets[max_length - 1][1] if max_length and len(offsets) > max_length else len(full)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        begin = _common_prefix(_render(tokenizer, messages[:i], True, kwargs), full)
        if begin >= limit:
            break  # beyond truncation
        spans.append((begin, _common_prefix(_render(tokenizer, messages[: i + 1], False, kwargs), full)))
    stop_ids = end_of_turn_ids(tokenizer)
    mask = [0] * len(input_ids)
    t = 0
    for begin, end in spans:
        while t < len(offsets) and offsets[t][1] <= begin:
            t += 1
        while t < len(offsets) and offsets[t][0] < end:
            mask[t] = 1
            t += 1
            if input_ids[t - 1] in stop_ids:
                break  # what follows the end-of-turn token is template glue, not generated
    return {"input_ids": input_ids, "loss_mask": mask}


def tokenize_conversation(tokenizer, messages: List[dict], max_length: int,
                          system_prompt: Optional[str] = None, chat_template_kwargs: Optional[dict] = None,
                          mask_method: str = "auto"
                          ) -> Dict[str, List[int]]:
    """{"input_ids", "loss_mask"} of one conversation, loss_mask 1 on assistant tokens, truncated to
    max_length."""
    if system_prompt is not None and (not messages or messages[0]["role"] != "system"):
        messages = [{"role": "system", "content": system_prompt}] + list(messages)
    kwargs = dict(chat_template_kwargs or {})
    if mask_method == "auto":
        mask_method = "generation" if has_generation_tags(tokenizer) else "diff"
    if mask_method == "generation":
        if not has_generation_tags(tokenizer):
            raise ValueError("data.mask_method=generation but the chat template has no {% generation %} "
                             "block")
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True, **kwargs)
        result = {"input_ids": list(out["input_ids"]), "loss_mask": list(out["assistant_masks"])}
    elif mask_method == "diff":
        result = diff_assistant_mask(tokenizer, messages, kwargs, max_length)
    else:
        raise ValueError(f"data.mask_method {mask_method!r} unknown; choose auto, generation or diff")
    return {k: v[:max_length] for k, v in result.items()}


def render_prompt(tokenizer, messages: List[dict]) -> List[int]:
    """Token ids of the conversation in the tokenizer's chat template (generation prompt added); the raw text
    of the last message when the tokenizer has no chat template (completion prompt)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(messages[-1]["content"])["input_ids"])
