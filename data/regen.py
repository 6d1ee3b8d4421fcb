"""Regenerate assistant replies with the target: replay each conversation's user turns through OpenAI-compatible
/v1/chat/completions endpoints (round-robin over base URLs, bounded concurrency, retries with exponential backoff).

Output: ``regen-NNNNN.jsonl`` shards of ``{"id", "messages", "temperatures"}`` covering consecutive source records,
each written atomically once all of its conversations are done.  Finished conversations of unfinished shards are
journaled (``regen-NNNNN.jsonl.partial``, one line each), so an interrupted run continues without duplicates or
losses.  The output directory is itself a valid ``data.source=openai`` path.
"""
from __future__ import annotations

import glob
import http.client
import itertools
import json
import os
import random
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from data.io import atomic_write_text
from data.sources import DataConfig, load_conversations, source_fingerprint, split_train_eval


@dataclass
class RegenConfig:
    base_urls: List[str] = field(default_factory=lambda: ["http://127.0.0.1:8000/v1"])
    model: str = ""                        # "" -> the first model listed by the first base URL
    output_dir: str = "regen"
    concurrency: int = 8                   # conversations in flight
    max_tokens: int = 1024
    temperatures: List[float] = field(default_factory=lambda: [0.0, 0.7, 1.0])
    temperature_weights: List[float] = field(default_factory=lambda: [0.2, 0.4, 0.4])
    max_retries: int = 5                   # per request, on connection errors, timeouts, 429 and 5xx
    backoff_s: float = 0.5                 # first retry delay; doubles each retry (with jitter)
    max_backoff_s: float = 30.0
    timeout_s: float = 300.0
    shard_size: int = 1000                 # source conversations per output shard
    seed: int = 0
    api_key: str = ""


class RetryableError(Exception):
    pass


class Client:
    """Posts chat requests round-robin over the base URLs and retries transient failures."""

    def __init__(self, cfg: RegenConfig):
        if not cfg.base_urls:
            raise ValueError("regen.base_urls is empty")
        self.cfg = cfg
        self._next_url = itertools.count()
        self.num_requests = 0
        self.num_retries = 0
        self._lock = threading.Lock()

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
            if e.code >= 500 or e.code == 429:
                raise RetryableError(f"HTTP {e.code}") from e
            raise ValueError(f"{request.full_url}: HTTP {e.code}: {e.read()[:300]!r}") from e
        except (urllib.error.URLError, http.client.HTTPException, ConnectionError, socket.timeout, TimeoutError,
                json.JSONDecodeError) as e:
            raise RetryableError(repr(e)) from e

    def request(self, method: str, path: str, body: Optional[dict] = None, rng: Optional[random.Random] = None) -> dict:
        rng = rng or random.Random()
        for attempt in range(self.cfg.max_retries + 1):
            with self._lock:
                self.num_requests += 1
            try:
                return self._call(method, path, body)
            except RetryableError:
                if attempt == self.cfg.max_retries:
                    raise
                with self._lock:
                    self.num_retries += 1
                delay = min(self.cfg.max_backoff_s, self.cfg.backoff_s * 2 ** attempt)
                time.sleep(delay * (0.5 + 0.5 * rng.random()))
        raise AssertionError("unreachable")


def regenerate_conversation(client: Client, cfg: RegenConfig, model: str, index: int, record: dict) -> dict:
    rng = random.Random(f"{cfg.seed}:{index}")
    history: List[dict] = []
    temperatures = []
    for m in record["messages"]:
        if m["role"] == "assistant":
            continue  # replaced by the endpoint's reply to the preceding user turn
        history.append({"role": m["role"], "content": m["content"]})
        if m["role"] != "user":
            continue
        temperature = rng.choices(cfg.temperatures, weights=cfg.temperature_weights)[0]
        reply = client.request("POST", "/chat/completions", {
            "model": model, "messages": history, "max_tokens": cfg.max_tokens, "temperature": temperature,
            "seed": rng.randrange(2 ** 31)}, rng)
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError) as e:
            raise ValueError(f"malformed completion for conversation {record['id']}: {str(reply)[:200]}") from e
        history.append({"role": "assistant", "content": content or ""})
        temperatures.append(temperature)
    return {"id": record["id"], "messages": history, "temperatures": temperatures}


def _write_atomic(path: str, lines: List[str]) -> None:
    atomic_write_text(path, "".join(lines))


class ShardJournal:
    """Done conversations per output shard; finished shards are final files, others append-only journals."""

    def __init__(self, output_dir: str, shard_size: int, num_records: int):
        self.dir, self.shard_size, self.num_records = output_dir, shard_size, num_records
        self.done: Dict[int, Dict[int, str]] = {}  # shard -> index -> JSON line
        self.final = set()
        self.lock = threading.Lock()
        for stray in glob.glob(os.path.join(output_dir, "*.tmp*")):
            os.remove(stray)
        for shard in range(-(-num_records // shard_size)):
            if os.path.exists(self.final_path(shard)):
                self.final.add(shard)
                if os.path.exists(self.journal_path(shard)):  # killed between the rename and the removal
                    os.remove(self.journal_path(shard))
                continue
            lines: Dict[int, str] = {}
            if os.path.exists(self.journal_path(shard)):
                with open(self.journal_path(shard)) as f:
                    for line in f:
                        try:
                            entry = json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a line cut off by the interruption
                        lines[entry["index"]] = json.dumps(entry["record"]) + "\n"
                # rewrite without the cut-off line before appending again
                _write_atomic(self.journal_path(shard), [json.dumps({"index": i, "record": json.loads(l)}) + "\n"
                                                          for i, l in sorted(lines.items())])
            self.done[shard] = lines

    def final_path(self, shard: int) -> str:
        return os.path.join(self.dir, f"regen-{shard:05d}.jsonl")

    def journal_path(self, shard: int) -> str:
        return os.path.join(self.dir, f"regen-{shard:05d}.jsonl.partial")

    def is_done(self, index: int) -> bool:
        shard = index // self.shard_size
        return shard in self.final or index in self.done[shard]

    def shard_len(self, shard: int) -> int:
        return min(self.shard_size, self.num_records - shard * self.shard_size)

    def add(self, index: int, record: dict) -> None:
        shard = index // self.shard_size
        with self.lock:
            if shard in self.final or index in self.done[shard]:
                return
            with open(self.journal_path(shard), "a") as f:
                f.write(json.dumps({"index": index, "record": record}) + "\n")
            self.done[shard][index] = json.dumps(record) + "\n"
            self.finalise(shard)

    def finalise(self, shard: int) -> None:
        if shard in self.final or len(self.done[shard]) < self.shard_len(shard):
            return
        _write_atomic(self.final_path(shard), [line for _, line in sorted(self.done[shard].items())])
        os.remove(self.journal_path(shard))
        self.final.add(shard)


def run_regen(cfg: RegenConfig, data_cfg: DataConfig) -> Dict[str, int]:
    """Regenerates the train split of `data_cfg`; returns counts (done, failed, skipped, requests, retries)."""
    records, report = load_conversations(data_cfg)
    print(report.summary(), flush=True)
    records = split_train_eval(records, data_cfg)[0]
    os.makedirs(cfg.output_dir, exist_ok=True)
    meta_path = os.path.join(cfg.output_dir, ".regen.json")
    meta = {"source": source_fingerprint(data_cfg), "num_records": len(records), "shard_size": cfg.shard_size}
    if os.path.exists(meta_path):
        with open(meta_path) as f:
            old = json.load(f)
        if old != meta:
            raise ValueError(f"{meta_path}: output was started for other data or shard_size ({old}); "
                             "use another regen.output_dir")
    else:
        _write_atomic(meta_path, [json.dumps(meta)])
    journal = ShardJournal(cfg.output_dir, cfg.shard_size, len(records))
    for shard in list(journal.done):
        journal.finalise(shard)  # a run killed between the journal line and the shard rename
    client = Client(cfg)
    model = cfg.model or client.request("GET", "/models")["data"][0]["id"]
    todo = [i for i in range(len(records)) if not journal.is_done(i)]
    stats = {"done": 0, "failed": 0, "skipped": len(records) - len(todo)}
    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        pending = {}
        queue = iter(todo)
        while True:
            while len(pending) < 2 * cfg.concurrency:
                index = next(queue, None)
                if index is None:
                    break
                pending[pool.submit(regenerate_conversation, client, cfg, model, index, records[index])] = index
            if not pending:
                break
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in finished:
                index = pending.pop(future)
                try:
                    journal.add(index, future.result())
                    stats["done"] += 1
                except (RetryableError, ValueError) as e:
                    stats["failed"] += 1
                    print(f"regen: conversation {records[index]['id']} failed: {e}", flush=True)
    stats.update(requests=client.num_requests, retries=client.num_retries)
    print(f"regen: {stats}; incomplete shards are resumed by rerunning" if stats["failed"] else f"regen: {stats}",
          flush=True)
    return stats
