"""Regenerate assistant replies with the target: replay each conversation's user turns through
OpenAI-compatible /v1/chat/completions endpoints (`vllm serve`, SGLang; round-robin over base URLs, bounded
concurrency, retries with exponential backoff).

Output: ``regen-NNNNN.jsonl`` shards of ``{"id", "messages", "temperatures", "finish_reasons"}`` (the last two
per reply) covering consecutive source records, each written atomically once all of its conversations are
settled.
A conversation is either written or rejected:
a reply that is empty, stopped by ``max_tokens`` (finish_reason=length; kept instead with ``keep_length_cut``)
or refused with HTTP 400/413/422 (an over-long prompt) rejects the whole conversation, counted per reason and
listed in ``regen-NNNNN.rejected``.
Settled conversations of unfinished shards are journaled (``regen-NNNNN.jsonl.partial``, one line each), so an
interrupted run continues without duplicates or losses.  Each user turn's temperature and seed come from the
conversation's own generator (retry jitter does not), so a retried or resumed run asks for what an
uninterrupted one does.  The output directory is itself a valid ``data.source=openai`` path.
"""
from __future__ import annotations

import glob
import http.client
import itertools
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from data.io import atomic_write_text
from data.paths import SERVE_SCRIPT
from data.sources import DataConfig, load_conversations, source_fingerprint, split_train_eval

ROW_ERROR_STATUSES = (400, 413, 422)  # the request itself is refused (e.g. prompt over max_model_len): reject
                                      # the row
# ... when the error names no field or the prompt (vLLM: "input_tokens"); an error naming a setting of ours
# (vLLM: "max_tokens" over max_model_len, "temperature", "logit_bias") would refuse every row alike: stop the
# run instead
ROW_ERROR_PARAMS = (None, "", "input_tokens", "messages", "prompt")


@dataclass
class RegenConfig:
    base_urls: List[str] = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])
    model: str = ""                        # "" -> the first model listed by the first base URL
    output_dir: str = "regen"
    concurrency: int = 8                   # conversations in flight
    max_tokens: int = 1024                 # per reply; a reply cut by it rejects the conversation ("length")
    keep_length_cut: bool = False          # write replies cut by max_tokens instead (still the target's own
                                           # text)
    temperatures: List[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])
    temperature_weights: List[float] = field(default_factory=lambda: [0.2, 0.4, 0.4])
    extra_body: Dict[str, Any] = field(default_factory=dict)  # more request fields: top_p, logit_bias,
                                                              # stop, ...
    max_retries: int = 5                   # per request, on connection errors, timeouts, 429 and 5xx
    backoff_s: float = 0.5                 # first retry delay; doubles each retry (with jitter)
    max_backoff_s: float = 30.0
    timeout_s: float = 300.0
    shard_size: int = 1000                 # source conversations per output shard
    seed: int = 0
    api_key: str = ""
    min_done_share: float = 0.5            # `aerie regen` exits 1 when a run writes less than this share of
                                           # the conversations it tried (and always when it writes none)


class RetryableError(Exception):
    pass


class MalformedReply(Exception):
    pass


class Rejected(Exception):
    """The server's answer for one turn is unusable; the conversation is skipped and counted under
    `reason`."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail = reason, detail


class Client:
    """Posts chat requests round-robin over the base URLs and retries transient failures."""

    def __init__(self, cfg: RegenConfig):
        if not cfg.base_urls:
            raise ValueError("regen.base_urls is empty")
        self.cfg = cfg
        self._next_url = itertools.count()
        self.num_requests = 0
        self.num_retries = 0
        self.num_completion_tokens = 0  # as the server's usage reports them
        self._lock = threading.Lock()
        self._jitter = random.Random()  # never a conversation's generator: retries must not shift its draws

    def _url(self) -> str:
        urls = self.cfg.base_urls
        return urls[next(self._next_url) % len(urls)].rstrip("/")

    def _call(self, method: str, path: str, body: Optional[dict]) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.cfg.api_key:
            headers["Authorization"] = f"Bearer {self.cfg.api_key}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self._url() + path, data=data, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=self.cfg.timeout_s) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as e:
            if e.code >= 500 or e.code in (408, 429):
                raise RetryableError(f"HTTP {e.code}") from e
            message = e.read()[:1000].decode("utf-8", "replace")
            param = _error_param(message)
            if e.code in ROW_ERROR_STATUSES and param in ROW_ERROR_PARAMS:
                raise Rejected(f"http_{e.code}", message[:300]) from e
            hint = (f"a request field is refused: {param} (regen.max_tokens, regen.extra_body)" if param else
                    "check regen.base_urls, regen.model and regen.api_key")
            raise ValueError(f"{request.full_url}: HTTP {e.code} ({hint}): {message[:300]}") from e
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout,
                TimeoutError, json.JSONDecodeError) as e:
            raise RetryableError(repr(e)) from e

    def request(self, method: str, path: str, body: Optional[dict] = None) -> dict:
        for attempt in range(self.cfg.max_retries + 1):
            with self._lock:
                self.num_requests += 1
            try:
                reply = self._call(method, path, body)
                with self._lock:
                    self.num_completion_tokens += int((reply.get("usage") or {}).get("completion_tokens")
                                                      or 0)
                return reply
            except RetryableError:
                if attempt == self.cfg.max_retries:
                    raise
                with self._lock:
                    self.num_retries += 1
                    jitter = 0.5 + 0.5 * self._jitter.random()
                time.sleep(min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** attempt) * jitter)
        raise AssertionError("unreachable")


def _error_param(body: str) -> Optional[str]:
    """The request field an OpenAI-style error body names ({"error": {"param": ...}}), if any."""
    try:
        error = json.loads(body).get("error")
        return error.get("param") if isinstance(error, dict) else None
    except (json.JSONDecodeError, AttributeError):
        return None


def _reply_content(reply: dict, conversation_id: str, keep_length_cut: bool = False) -> tuple:
    """(assistant text, finish_reason) of a completion; Rejected for an empty reply, or one cut by max_tokens
    unless `keep_length_cut`."""
    try:
        choice = reply["choices"][0]
        content = choice["message"]["content"]
    except (KeyError, IndexError, TypeError) as e:
        raise MalformedReply(f"malformed completion for conversation {conversation_id}: "
                             f"{str(reply)[:200]}") from e
    if choice.get("finish_reason") == "length" and not keep_length_cut:
        raise Rejected("length", "reply reached regen.max_tokens (regen.keep_length_cut=true keeps such "
                       "replies)")
    if not content or not content.strip():
        raise Rejected("empty")
    return content, choice.get("finish_reason")


def regenerate_conversation(client: Client, cfg: RegenConfig, model: str, index: int, record: dict) -> dict:
    """The record with every assistant turn replaced by the server's reply to the history before it."""
    rng = random.Random(f"{cfg.seed}:{index}")
    history: List[dict] = []
    temperatures, finish_reasons = [], []
    for m in record["messages"]:
        if m["role"] == "assistant":
            continue  # replaced by the endpoint's reply to the preceding user turn
        history.append({"role": m["role"], "content": m["content"]})
        if m["role"] != "user":
            continue
        temperature = rng.choices(cfg.temperatures, weights=cfg.temperature_weights)[0]
        seed = rng.randrange(2 ** 31)
        reply = client.request("POST", "/chat/completions", {
            **cfg.extra_body, "model": model, "messages": history, "max_tokens": cfg.max_tokens,
            "temperature": temperature, "seed": seed})
        content, finish_reason = _reply_content(reply, record["id"], cfg.keep_length_cut)
        history.append({"role": "assistant", "content": content})
        temperatures.append(temperature)
        finish_reasons.append(finish_reason)
    return {"id": record["id"], "messages": history, "temperatures": temperatures,
            "finish_reasons": finish_reasons}


class ShardJournal:
    """Settled conversations per output shard; finished shards are final files, others append-only journals.

    A shard is final once ``regen-N.jsonl`` exists, or ``regen-N.rejected`` exists without a journal (a shard
    in which every conversation was rejected).
    """

    def __init__(self, output_dir: str, shard_size: int, num_records: int):
        self.dir, self.shard_size, self.num_records = output_dir, shard_size, num_records
        self.done: Dict[int, Dict[int, str]] = {}      # shard -> index -> JSON line of the record
        self.rejected: Dict[int, Dict[int, str]] = {}  # shard -> index -> JSON line of the rejection
        self.final = set()
        self.num_final_rejected = 0
        self.lock = threading.Lock()
        for stray in glob.glob(os.path.join(output_dir, "*.tmp*")):
            os.remove(stray)
        for shard in range(-(-num_records // shard_size)):
            journal = self.path(shard, ".jsonl.partial")
            if os.path.exists(self.path(shard, ".jsonl")) or (
                    os.path.exists(self.path(shard, ".rejected")) and not os.path.exists(journal)):
                self.final.add(shard)
                if os.path.exists(journal):  # killed between the rename and the removal
                    os.remove(journal)
                continue
            done, rejected = {}, {}
            if os.path.exists(journal):
                with open(journal) as f:
                    for line in f:
                        try:
                            entry = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line cut off by the interruption
                        target = rejected if "rejected" in entry else done
                        target[entry["index"]] = json.dumps(entry.get("rejected", entry.get("record"))) + "\n"
                # rewrite without the cut-off line before appending again
                atomic_write_text(journal, "".join(self._journal_line(i, line, i in rejected)
                                                   for i, line in sorted({**done, **rejected}.items())))
            self.done[shard], self.rejected[shard] = done, rejected

    @staticmethod
    def _journal_line(index: int, line: str, rejected: bool) -> str:
        return json.dumps({"index": index, "rejected" if rejected else "record": json.loads(line)}) + "\n"

    def path(self, shard: int, suffix: str) -> str:
        return os.path.join(self.dir, f"regen-{shard:05d}{suffix}")

    def is_settled(self, index: int) -> bool:
        shard = index // self.shard_size
        return shard in self.final or index in self.done[shard] or index in self.rejected[shard]

    def shard_len(self, shard: int) -> int:
        return min(self.shard_size, self.num_records - shard * self.shard_size)

    def add(self, index: int, entry: dict, rejected: bool = False) -> None:
        """Journals a written record (or, rejected=True, a rejection) and finalises its shard when
        complete."""
        shard = index // self.shard_size
        line = json.dumps(entry) + "\n"
        with self.lock:
            if shard in self.final or index in self.done[shard] or index in self.rejected[shard]:
                return
            with open(self.path(shard, ".jsonl.partial"), "a") as f:
                f.write(self._journal_line(index, line, rejected))
            (self.rejected if rejected else self.done)[shard][index] = line
            self.finalise(shard)

    def finalise(self, shard: int) -> None:
        done, rejected = self.done[shard], self.rejected[shard]
        if shard in self.final or len(done) + len(rejected) < self.shard_len(shard):
            return
        if rejected:
            atomic_write_text(self.path(shard, ".rejected"),
                              "".join(line for _, line in sorted(rejected.items())))
        if done:
            atomic_write_text(self.path(shard, ".jsonl"), "".join(line for _, line in sorted(done.items())))
        os.remove(self.path(shard, ".jsonl.partial"))
        self.final.add(shard)


def _check_meta(cfg: RegenConfig, data_cfg: DataConfig, num_records: int) -> None:
    """The output directory belongs to one source and one set of generation settings."""
    meta_path = os.path.join(cfg.output_dir, ".regen.json")
    meta = {"source": source_fingerprint(data_cfg), "num_records": num_records, "shard_size": cfg.shard_size,
            "model": cfg.model, "max_tokens": cfg.max_tokens, "temperatures": list(cfg.temperatures),
            "temperature_weights": list(cfg.temperature_weights), "extra_body": cfg.extra_body,
            "seed": cfg.seed}
    if cfg.keep_length_cut:  # absent when off, so outputs begun before the option existed still resume
        meta["keep_length_cut"] = True
    meta = json.loads(json.dumps(meta))  # as it reads back
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        changed = sorted(k for k in meta.keys() | old.keys() if old.get(k) != meta.get(k))
        if changed:
            raise ValueError(f"{meta_path}: output was started with other {', '.join(changed)}; rerun with "
                             "the same settings or use another regen.output_dir")
    else:
        atomic_write_text(meta_path, json.dumps(meta))


def run_regen(cfg: RegenConfig, data_cfg: DataConfig) -> Dict[str, int]:
    """Regenerates the train split of `data_cfg`; returns counts: done (written), failed (retries exhausted or
    a malformed answer: retried by the next run), rejected_<reason>, skipped (settled by earlier runs),
    requests, retries, completion_tokens, and with keep_length_cut, kept_length (written replies cut by
    max_tokens)."""
    if len(cfg.temperatures) != len(cfg.temperature_weights) or not cfg.temperatures:
        raise ValueError(f"regen.temperatures ({len(cfg.temperatures)}) and regen.temperature_weights "
                         f"({len(cfg.temperature_weights)}) must be non-empty and of the same length")
    records, report = load_conversations(data_cfg)
    print(report.summary(), flush=True)
    records = split_train_eval(records, data_cfg)[0]
    os.makedirs(cfg.output_dir, exist_ok=True)
    _check_meta(cfg, data_cfg, len(records))
    journal = ShardJournal(cfg.output_dir, cfg.shard_size, len(records))
    for shard in list(journal.done):
        journal.finalise(shard)  # a run killed between the journal line and the shard rename
    client = Client(cfg)
    model = cfg.model or client.request("GET", "/models")["data"][0]["id"]
    todo = [i for i in range(len(records)) if not journal.is_settled(i)]
    stats: Dict[str, int] = {"done": 0, "failed": 0, "skipped": len(records) - len(todo)}
    rejected: Counter = Counter()
    num_cut = 0
    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        pending = {}
        queue = iter(todo)
        while True:
            while len(pending) < 2 * cfg.concurrency:
                index = next(queue, None)
                if index is None:
                    break
                pending[pool.submit(regenerate_conversation, client, cfg, model, index,
                                    records[index])] = index
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                index = pending.pop(future)
                conversation_id = records[index]["id"]
                try:
                    record = future.result()
                    journal.add(index, record)
                    stats["done"] += 1
                    num_cut += record["finish_reasons"].count("length")
                except Rejected as e:
                    journal.add(index, {"id": conversation_id, "reason": e.reason, "detail": e.detail}, True)
                    rejected[e.reason] += 1
                except ValueError:  # a setting is wrong (HTTP 401/403/404 ...): every request would fail
                                    # alike
                    for other in pending:
                        other.cancel()
                    raise
                except (RetryableError, MalformedReply) as e:
                    stats["failed"] += 1
                    print(f"regen: conversation {conversation_id} failed: {e}", flush=True)
    stats.update({f"rejected_{reason}": n for reason, n in sorted(rejected.items())})
    if cfg.keep_length_cut:
        stats["kept_length"] = num_cut
    stats.update(requests=client.num_requests, retries=client.num_retries,
                 completion_tokens=client.num_completion_tokens)
    print(f"regen: {stats}; failed conversations are retried by rerunning" if stats["failed"]
          else f"regen: {stats}", flush=True)
    return stats


def done_share_error(stats: Dict[str, int], min_done_share: float) -> Optional[str]:
    """A one-line reason to exit non-zero when the run wrote nothing or less than `min_done_share` of what it
    tried; None otherwise."""
    tried = stats["done"] + stats["failed"] + sum(n for k, n in stats.items() if k.startswith("rejected_"))
    if tried == 0 or (stats["done"] > 0 and stats["done"] >= min_done_share * tried):
        return None
    hint = ("; most replies reached regen.max_tokens: raise it, or keep them with regen.keep_length_cut=true"
            if 2 * stats.get("rejected_length", 0) > tried else "; see the counts above")
    return (f"aerie regen: wrote {stats['done']} of the {tried} conversations tried (regen.min_done_share="
            f"{min_done_share}){hint}")


class VllmServer:
    """launch/vllm/serve.sh for `target` on 127.0.0.1:`port` (0: a free one, kept across restarts), in its own
    session so that kill() reaches vLLM's engine processes too; start() returns once /health answers (the
    script prints the URL then)."""

    def __init__(self, target: str, port: int, python: str, log_path: str, args=(),
                 env: Optional[dict] = None):
        if port == 0:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
        self.target, self.port, self.log_path, self.args = target, port, log_path, list(args)
        self.env = {**os.environ, "AERIE_VLLM_PYTHON": python, **(env or {})}
        self.proc: Optional[subprocess.Popen] = None
        self.url = ""

    def start(self) -> str:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen([str(SERVE_SCRIPT), self.target, "--port", str(self.port),
                                          *self.args],
                                         stdout=subprocess.PIPE, stderr=log, env=self.env, text=True,
                                         start_new_session=True)
        self.url = self.proc.stdout.readline().strip()
        if not self.url:
            self.proc.wait()
            with open(self.log_path) as f:
                raise RuntimeError(f"serve.sh exited {self.proc.returncode}:\n{f.read()[-3000:]}")
        return self.url

    def kill(self) -> None:
        """SIGKILL to the script, the server and its engine processes."""
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (a clean shutdown; SIGKILL after timeout_s); returns serve.sh's exit status."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode
