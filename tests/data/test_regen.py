"""Regeneration against the local server, a flaky server (drops, 500s), and resume after a SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from data.regen import RegenConfig, run_regen
from data.serve import ServeConfig, make_server
from data.sources import DataConfig, load_conversations


def write_source(path, n):
    rows = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"hello {i}"},
                                              {"from": "gpt", "value": "old"},
                                              {"from": "human", "value": f"more {i}"},
                                              {"from": "gpt", "value": "old"}]} for i in range(n)]
    path.write_text(json.dumps(rows))
    return DataConfig(source="sharegpt", path=str(path))


class FlakyServer:
    """Echo chat server: request k drops the connection if k % 4 == 1, answers 500 if k % 4 == 2."""

    def __init__(self, delay_s=0.0):
        self.count = 0
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
                    k = outer.count
                time.sleep(delay_s)
                if k % 4 == 1:
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                status, reply = (500, {"error": "busy"}) if k % 4 == 2 else (200, {"choices": [{"message": {
                    "role": "assistant", "content": "echo " + body["messages"][-1]["content"]}}]})
                data = json.dumps(reply).encode()
                self.send_response(status)
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


def read_output(out_dir):
    records, report = load_conversations(DataConfig(source="openai", path=str(out_dir)))
    assert not report.counts
    return records


@pytest.mark.slow  # loads the fixture model (about 20 s on a busy 2-core machine)
def test_regen_against_local_server(tmp_path):
    server = make_server(ServeConfig(port=0))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/v1"
        cfg = RegenConfig(base_urls=[url], output_dir=str(tmp_path / "out"), concurrency=2, max_tokens=4,
                          shard_size=2, temperatures=[0.0, 1.0], temperature_weights=[0.5, 0.5])
        stats = run_regen(cfg, write_source(tmp_path / "src.json", 3))
    finally:
        server.shutdown()
        server.server_close()
    assert stats["done"] == 3 and stats["failed"] == 0
    assert sorted(os.listdir(tmp_path / "out")) == [".regen.json", "regen-00000.jsonl", "regen-00001.jsonl"]
    records = read_output(tmp_path / "out")
    assert [r["id"] for r in records] == ["c0", "c1", "c2"]
    assert [m["content"] for m in records[1]["messages"] if m["role"] == "user"] == ["hello 1", "more 1"]
    assert all(m["content"] != "old" for r in records for m in r["messages"] if m["role"] == "assistant")


def test_regen_retries_flaky_servers_round_robin(tmp_path):
    servers = [FlakyServer(), FlakyServer()]
    try:
        cfg = RegenConfig(base_urls=[s.url for s in servers], model="m", output_dir=str(tmp_path / "out"),
                          concurrency=3, backoff_s=0.01, max_retries=6, shard_size=4)
        stats = run_regen(cfg, write_source(tmp_path / "src.json", 6))
    finally:
        for s in servers:
            s.close()
    assert stats["done"] == 6 and stats["failed"] == 0 and stats["retries"] > 0
    assert all(s.count > 0 for s in servers)
    records = read_output(tmp_path / "out")
    assert [r["id"] for r in records] == [f"c{i}" for i in range(6)]
    assert records[4]["messages"][1]["content"] == "echo hello 4"


def test_regen_resumes_after_kill(tmp_path):
    server = FlakyServer(delay_s=0.05)
    out = tmp_path / "out"
    data_cfg = write_source(tmp_path / "src.json", 12)
    cfg = RegenConfig(base_urls=[server.url], model="m", output_dir=str(out), concurrency=2, backoff_s=0.01,
                      shard_size=5)
    code = ("import sys; from data.regen import RegenConfig, run_regen; from data.sources import DataConfig; "
            f"run_regen(RegenConfig(**{cfg.__dict__!r}), DataConfig(source='sharegpt', path={data_cfg.path!r}))")
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + 30
        while time.time() < deadline:
            lines = sum(1 for p in out.glob("regen-*") for _ in open(p)) if out.exists() else 0
            if lines >= 6:
                break
            time.sleep(0.02)
        else:
            pytest.fail("regen subprocess made no progress")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done_before = sum(1 for p in out.glob("regen-*") for _ in open(p))
    assert 6 <= done_before < 12
    stats = run_regen(cfg, data_cfg)
    server.close()
    assert stats["skipped"] >= 6 and stats["done"] + stats["skipped"] == 12 and stats["failed"] == 0
    records = read_output(out)
    assert [r["id"] for r in records] == [f"c{i}" for i in range(12)]  # no duplicates, no losses, in order
    assert not list(out.glob("*.partial"))
