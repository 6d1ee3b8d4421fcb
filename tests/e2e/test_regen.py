"""Regeneration against small in-process chat servers: flaky servers (drops, 500s), bad answers counted per
reason, retries that do not change the data, resume after a SIGKILL, and the exit status of `aerie regen`.
(Against a real `vllm serve`: tests/e2e/test_regen_vllm.py.)"""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data.regen import RegenConfig, done_share_error, run_regen
from data.sources import DataConfig
from tests.helpers import read_output, run_aerie, settled_ids


def write_source(path, n, first_turns=None):
    first_turns = first_turns or {}
    rows = [{"id": f"c{i}", "conversations": [{"from": "human", "value": first_turns.get(i, f"hello {i}")},
                                              {"from": "gpt", "value": "old"},
                                              {"from": "human", "value": f"more {i}"},
                                              {"from": "gpt", "value": "old"}]} for i in range(n)]
    path.write_text(json.dumps(rows))
    return DataConfig(source="sharegpt", path=str(path))


def echo(body):
    """A reply naming the turn, its temperature and seed, so the output shows what was asked for."""
    text = f"echo {body['messages'][-1]['content']} t={body['temperature']} s={body['seed']}"
    return 200, {"choices": [{"message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


class ChatServer:
    """Loopback chat server; respond(body, k) gives (status, reply) for the k-th request, or None to drop
    it."""

    def __init__(self, respond=lambda body, k: echo(body), delay_s=0.0):
        self.count = self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.count += 1
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                    k = outer.count
                time.sleep(delay_s)
                with outer.lock:
                    outer.in_flight -= 1
                answer = respond(body, k)
                if answer is None:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                data = json.dumps(answer[1]).encode()
                self.send_response(answer[0])
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def flaky(body, k):
    """Request k drops the connection if k % 4 == 1, answers 500 if k % 4 == 2, else echoes."""
    return None if k % 4 == 1 else (500, {"error": "busy"}) if k % 4 == 2 else echo(body)


def regen(urls, tmp_path, data_cfg, name="out", **overrides):
    cfg = RegenConfig(base_urls=urls, model="m", output_dir=str(tmp_path / name), backoff_s=0.01,
                      **{"concurrency": 3, "max_retries": 6, "shard_size": 4, **overrides})
    return run_regen(cfg, data_cfg)


def test_regen_retries_flaky_servers_round_robin_and_retries_do_not_change_the_data(tmp_path):
    data_cfg = write_source(tmp_path / "src.json", 6)
    servers = [ChatServer(flaky), ChatServer(flaky)]
    clean = ChatServer()
    try:
        mixture = dict(temperatures=[0.0, 0.5, 1.0], temperature_weights=[1, 1, 1])
        stats = regen([s.url for s in servers], tmp_path, data_cfg, **mixture)
        regen([clean.url], tmp_path, data_cfg, name="clean", **mixture)
    finally:
        for s in servers + [clean]:
            s.close()
    assert stats["done"] == 6 and stats["failed"] == 0 and stats["retries"] > 0
    assert all(s.count > 0 for s in servers)
    records = read_output(tmp_path / "out")
    assert [r["id"] for r in records] == [f"c{i}" for i in range(6)]
    assert records[4]["messages"][1]["content"].startswith("echo hello 4 t=")
    assert records[4]["messages"][3]["content"].startswith("echo more 4 t=")  # the second turn was replayed
    # every turn's temperature and seed are those of the run without a single retry
    raw = [json.loads(line) for p in sorted((tmp_path / "out").glob("*.jsonl")) for line in open(p)]
    assert raw == [json.loads(line) for p in sorted((tmp_path / "clean").glob("*.jsonl")) for line in open(p)]
    assert {t for r in raw for t in r["temperatures"]} == {0.0, 0.5, 1.0}


def bad_answers(body, k):
    """Answers by the conversation's first user turn: "empty", "cut" (finish_reason=length), "huge" (HTTP
    400)."""
    first = body["messages"][0]["content"]
    if first == "huge":
        return 400, {"error": {"message": "maximum context length is 1024 tokens", "code": 400}}
    if first == "empty" and len(body["messages"]) == 3:  # the second turn
        return 200, {"choices": [{"message": {"role": "assistant", "content": "  "},
                                  "finish_reason": "stop"}]}
    if first == "cut":
        return 200, {"choices": [{"message": {"role": "assistant", "content": "partial"},
                                  "finish_reason": "length"}]}
    return echo(body)


def test_bad_answers_are_counted_per_reason_never_written_and_not_asked_again(tmp_path):
    data_cfg = write_source(tmp_path / "src.json", 7, {1: "huge", 3: "empty", 4: "cut", 6: "cut"})
    server = ChatServer(bad_answers)
    try:
        stats = regen([server.url], tmp_path, data_cfg)
        num_requests = server.count
        again = regen([server.url], tmp_path, data_cfg)
    finally:
        server.close()
    assert (stats["done"], stats["failed"]) == (3, 0)
    assert (stats["rejected_http_400"], stats["rejected_empty"], stats["rejected_length"]) == (1, 1, 2)
    assert [r["id"] for r in read_output(tmp_path / "out")] == ["c0", "c2", "c5"]
    rejected = [json.loads(line) for p in sorted((tmp_path / "out").glob("*.rejected")) for line in open(p)]
    assert [(r["id"], r["reason"]) for r in rejected] == [("c1", "http_400"), ("c3", "empty"),
                                                          ("c4", "length"), ("c6", "length")]
    assert "maximum context length" in rejected[0]["detail"]
    assert again["skipped"] == 7 and again["done"] == 0 and server.count == num_requests
    assert not list((tmp_path / "out").glob("*.partial"))


def test_keep_length_cut_writes_replies_cut_by_max_tokens_and_counts_them(tmp_path):
    data_cfg = write_source(tmp_path / "src.json", 7, {1: "huge", 3: "empty", 4: "cut", 6: "cut"})
    server = ChatServer(bad_answers)
    try:
        stats = regen([server.url], tmp_path, data_cfg, keep_length_cut=True)
        with pytest.raises(ValueError, match="other keep_length_cut"):  # the same output, other rows kept
            regen([server.url], tmp_path, data_cfg)
    finally:
        server.close()
    assert (stats["done"], stats["kept_length"], stats["rejected_http_400"],
            stats["rejected_empty"]) == (5, 4, 1, 1)
    assert "rejected_length" not in stats
    records = {r["id"]: r for r in read_output(tmp_path / "out")}
    assert sorted(records) == ["c0", "c2", "c4", "c5", "c6"]
    assert ([m["content"] for m in records["c4"]["messages"] if m["role"] == "assistant"]
            == ["partial", "partial"])
    raw = [json.loads(line) for p in sorted((tmp_path / "out").glob("*.jsonl")) for line in open(p)]
    assert {r["id"]: r["finish_reasons"] for r in raw}["c4"] == ["length", "length"]
    assert {r["id"]: r["finish_reasons"] for r in raw}["c0"] == ["stop", "stop"]


def test_a_wrong_setting_stops_the_run_with_one_line(tmp_path):
    server = ChatServer(lambda body, k: (404, {"error": {"message": "The model `m` does not exist."}}))
    try:
        with pytest.raises(ValueError, match="HTTP 404 .*regen.model"):
            regen([server.url], tmp_path, write_source(tmp_path / "src.json", 3))
    finally:
        server.close()


def test_changed_generation_settings_are_refused_on_resume(tmp_path):
    data_cfg = write_source(tmp_path / "src.json", 2)
    server = ChatServer()
    try:
        regen([server.url], tmp_path, data_cfg, max_tokens=16)
        with pytest.raises(ValueError, match="other max_tokens"):
            regen([server.url], tmp_path, data_cfg, max_tokens=32)
    finally:
        server.close()


def test_at_most_concurrency_conversations_are_in_flight(tmp_path):
    server = ChatServer(delay_s=0.02)
    try:
        stats = regen([server.url], tmp_path, write_source(tmp_path / "src.json", 12), concurrency=3)
    finally:
        server.close()
    assert stats["done"] == 12 and server.max_in_flight == 3


def test_regen_resumes_after_kill(tmp_path):
    server = ChatServer(flaky, delay_s=0.05)
    out = tmp_path / "out"
    data_cfg = write_source(tmp_path / "src.json", 12)
    cfg = RegenConfig(base_urls=[server.url], model="m", output_dir=str(out), concurrency=2, backoff_s=0.01,
                      shard_size=5)
    code = ("import sys; from data.regen import RegenConfig, run_regen; from data.sources import DataConfig; "
            f"run_regen(RegenConfig(**{cfg.__dict__!r}), "
            f"DataConfig(source='sharegpt', path={data_cfg.path!r}))")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            if len(settled_ids(out)) >= 6:
                break
            time.sleep(0.02)
        else:
            pytest.fail("regen subprocess made no progress")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert 6 <= len(settled_ids(out)) < 12
    stats = run_regen(cfg, data_cfg)
    server.close()
    assert stats["skipped"] >= 6 and stats["done"] + stats["skipped"] == 12 and stats["failed"] == 0
    records = read_output(out)
    assert [r["id"] for r in records] == [f"c{i}" for i in range(12)]  # no duplicates, no losses, in order
    assert not list(out.glob("*.partial"))


def test_a_run_that_writes_too_little_is_an_error(tmp_path):
    data_cfg = write_source(tmp_path / "src.json", 4, {0: "cut", 1: "cut", 2: "cut"})
    server = ChatServer(bad_answers)
    try:
        stats = regen([server.url], tmp_path, data_cfg)
    finally:
        server.close()
    assert (stats["done"], stats["rejected_length"]) == (1, 3)
    assert done_share_error(stats, 0.25) is None
    assert done_share_error(stats, 0.5) == ("aerie regen: wrote 1 of the 4 conversations tried "
                                            "(regen.min_done_share=0.5); most replies reached "
                                            "regen.max_tokens: raise it, or keep them with "
                                            "regen.keep_length_cut=true")
    assert done_share_error({**stats, "rejected_length": 1, "failed": 2}, 0.5).endswith(
        "see the counts above")
    # nothing to do
    assert done_share_error({**stats, "done": 0, "skipped": 4, "rejected_length": 0}, 0.5) is None
    # the CLI: nothing listens at the URL, every conversation fails: exit 1 with one line, not a traceback
    proc = run_aerie("regen", f"regen.base_urls=[{server.url}]", "regen.model=m", "regen.max_retries=0",
                     "data.source=sharegpt", f"data.path={data_cfg.path}",
                     f"regen.output_dir={tmp_path / 'c'}", check=False)
    assert proc.returncode == 1 and "done=0 failed=4" in proc.stdout and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "aerie regen: wrote 0 of the 4 conversations tried")


def test_an_http_400_naming_a_setting_stops_the_run(tmp_path):
    refusal = {"error": {"message": "max_tokens=2000 cannot be greater than max_model_len=1024.",
                         "param": "max_tokens", "code": 400}}
    server = ChatServer(lambda body, k: (400, refusal))
    try:
        with pytest.raises(ValueError, match=r"HTTP 400 \(a request field is refused: max_tokens"):
            regen([server.url], tmp_path, write_source(tmp_path / "src.json", 3))
    finally:
        server.close()
    assert not list((tmp_path / "out").glob("regen-*"))  # nothing journaled as rejected
