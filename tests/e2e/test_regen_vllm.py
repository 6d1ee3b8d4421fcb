"""`aerie regen` against a real `vllm serve` of the tiny target on loopback (launch/vllm/serve.sh, vLLM's CPU
build): multi-turn replay with a temperature mixture, bad answers counted per reason, and no lost or
duplicated conversation after a `kill -9` of regen and a kill and restart of the server mid-run.  One server
per module."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from data.regen import RegenConfig, VllmServer, run_regen
from data.sources import DataConfig
from tests.helpers import REPO, TINY_CHAT, read_output, run_aerie, settled_ids

pytestmark = pytest.mark.slow
EOS = "2"  # <|im_end|> of the tiny target
SHORT = {"logit_bias": {EOS: 6.0}}  # replies end after a few tokens: fast, and few of them cut by max_tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from tools.vllm.engine import vllm_python

    try:
        python = vllm_python()
    except ValueError as e:
        pytest.skip(str(e))
    server = VllmServer(str(TINY_CHAT), 0, python, str(tmp_path_factory.mktemp("vllm") / "serve.log"),
                        ["--max-model-len", "1024", "--max-num-seqs", "16"],
                        {"VLLM_CPU_KVCACHE_SPACE": "1", "AERIE_SERVE_TIMEOUT": "600"})
    assert server.start() == f"http://127.0.0.1:{server.port}/v1"
    yield server
    assert server.stop() == 0  # serve.sh exits with the server's status after SIGTERM


def write_source(path, user_turns):
    """One ShareGPT row per entry of `user_turns` (its user messages; the old answers are placeholders)."""
    rows = [{"id": f"c{i}", "conversations": [t for u in turns for t in ({"from": "human", "value": u},
                                                                         {"from": "gpt", "value": "old"})]}
            for i, turns in enumerate(user_turns)]
    path.write_text(json.dumps(rows))
    return DataConfig(source="sharegpt", path=str(path))


def raw_lines(out_dir, pattern):
    return [json.loads(line) for p in sorted(Path(out_dir).glob(pattern)) for line in open(p)]


def test_multi_turn_replay_with_a_temperature_mixture_and_bad_rows_per_reason(server, tmp_path):
    topics = ["hello", "What is the capital of France?", "Write a poem about the sea.", "Explain recursion."]
    turns = [[f"{topics[i % 4]} ({i})", "Tell me more."] for i in range(8)] + [["word " * 1100, "and?"]]
    data_cfg = write_source(tmp_path / "src.json", turns)
    cfg = RegenConfig(base_urls=[server.url], output_dir=str(tmp_path / "out"), concurrency=4, max_tokens=48,
                      temperatures=[0.0, 1.0], temperature_weights=[0.5, 0.5], extra_body=SHORT, shard_size=4)
    stats = run_regen(cfg, data_cfg)
    assert stats["failed"] == 0 and stats["rejected_http_400"] == 1  # the prompt over max_model_len=1024
    rejected = raw_lines(tmp_path / "out", "*.rejected")
    assert ("c8", "http_400") in {(r["id"], r["reason"]) for r in rejected}
    assert "maximum context length is 1024" in next(r["detail"] for r in rejected if r["id"] == "c8")
    assert sum(n for k, n in stats.items() if k.startswith("rejected_")) == len(rejected)
    assert {r["reason"] for r in rejected} <= {"http_400", "length", "empty"}
    written = raw_lines(tmp_path / "out", "*.jsonl")
    assert stats["done"] == len(written) >= 4
    # each exactly once
    assert sorted(r["id"] for r in written + rejected) == sorted(f"c{i}" for i in range(9))
    for record, parsed in zip(written, read_output(tmp_path / "out")):
        i = int(record["id"][1:])
        assert [m["content"] for m in record["messages"] if m["role"] == "user"] == turns[i]
        answers = [m["content"] for m in record["messages"] if m["role"] == "assistant"]
        assert len(answers) == 2 and all(a.strip() and a != "old" for a in answers)
        assert len(record["temperatures"]) == 2 and set(record["temperatures"]) <= {0.0, 1.0}
        assert parsed["messages"] == record["messages"]
    assert {t for r in written for t in r["temperatures"]} == {0.0, 1.0}


def test_empty_and_length_cut_answers_of_vllm_are_rejected_and_the_command_fails(server, tmp_path):
    data_cfg = write_source(tmp_path / "src.json", [["hello"], ["What is the capital of France?"]])
    cut = run_regen(RegenConfig(base_urls=[server.url], output_dir=str(tmp_path / "cut"), max_tokens=1,
                                temperatures=[0.0], temperature_weights=[1.0]), data_cfg)
    assert (cut["done"], cut["rejected_length"]) == (0, 2)  # the greedy first tokens are not <|im_end|>
    # every reply is empty (<|im_end|> forced): nothing is written and `aerie regen` exits 1 with one line
    proc = run_aerie("regen", f"regen.base_urls=[{server.url}]", "data.source=sharegpt",
                     f"data.path={data_cfg.path}", f"regen.output_dir={tmp_path / 'empty'}",
                     f"+regen.extra_body.logit_bias={{{EOS}:100}}", check=False)
    assert proc.returncode == 1 and "done=0" in proc.stdout and "rejected_empty=2" in proc.stdout
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "aerie regen: wrote 0 of the 2 conversations tried")
    assert not list((tmp_path / "empty").glob("*.jsonl"))


def wait_for(condition, timeout_s, what):
    deadline = time.time() + timeout_s
    while not condition():
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_no_conversation_lost_or_duplicated_after_kill_9_and_a_server_restart(server, tmp_path):
    num = 40
    data_cfg = write_source(tmp_path / "src.json", [[f"hello {i}", "Tell me more."] for i in range(num)])
    out = tmp_path / "out"
    cfg = RegenConfig(base_urls=[server.url], output_dir=str(out), concurrency=2, max_tokens=32, shard_size=6,
                      temperatures=[0.0, 1.0], temperature_weights=[0.5, 0.5], extra_body=SHORT,
                      # retries for 10+ minutes: a restart on a loaded machine
                      max_retries=400, backoff_s=0.2, max_backoff_s=3.0)
    code = ("import json, sys; from data.regen import RegenConfig, run_regen; "
            "from data.sources import DataConfig; "
            f"print(json.dumps(run_regen(RegenConfig(**{cfg.__dict__!r}), DataConfig(source='sharegpt', "
            f"path={data_cfg.path!r}))))")
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def start():
        return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, text=True)

    first = start()
    try:
        wait_for(lambda: len(settled_ids(out)) >= 5 if out.exists() else False, 120,
                 "the first regen's progress")
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    before_restart = len(settled_ids(out))
    assert before_restart < num
    second = start()
    try:
        wait_for(lambda: len(settled_ids(out)) >= before_restart + 2, 120, "the resumed regen's progress")
        server.kill()  # mid-run: requests in flight fail, the client retries until the server is back
        killed_at = len(settled_ids(out))
        server.start()  # same port
        stdout, _ = second.communicate(timeout=600)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert second.returncode == 0
    stats = json.loads(stdout.strip().splitlines()[-1])
    assert killed_at < num and stats["retries"] > 0 and stats["skipped"] >= before_restart
    # retries ran out before the server was back: the next run does those (and only those)
    if stats["failed"]:
        again = run_regen(cfg, data_cfg)
        assert (again["done"] + sum(n for k, n in again.items() if k.startswith("rejected_"))
                == stats["failed"])
    ids = [r["id"] for r in raw_lines(out, "*.jsonl") + raw_lines(out, "*.rejected")]
    assert len(ids) == num and len(set(ids)) == num  # zero lost, zero duplicated
    assert not list(out.glob("*.partial"))


def test_the_vllm_pipeline_recipe_end_to_end(server, tmp_path, data_cache):
    """conf/experiment/vllm_pipeline.yaml as the README runs it (short settings): regen through the served
    target, train on its answers, export, and vLLM's own acceptance counters for the export."""
    run_dir = tmp_path / "run"
    common = ["experiment=vllm_pipeline", f"run_dir={run_dir}", f"data.cache_dir={data_cache}",
              "data.max_samples=6", "draft.draft_vocab_size=1024", "draft.ttt_steps=3",
              "logger.progress=false"]
    regen = run_aerie("regen", *common, f"regen.base_urls=[{server.url}]", "regen.max_tokens=24")
    counts = dict(kv.split("=") for kv in regen.stdout.strip().splitlines()[-1].split())
    written = [json.loads(line) for p in sorted((run_dir / "regen").glob("regen-*.jsonl"))
               for line in open(p)]
    assert int(counts["done"]) == len(written) >= 4 and int(counts["kept_length"]) > 0  # cut replies kept
    assert "length" in {r for record in written for r in record["finish_reasons"]}
    train = ["data.source=openai", f"data.path={run_dir / 'regen'}", "trainer.max_steps=3",
             "data.max_length=256", "trainer.max_tokens_per_batch=256", "trainer.ckpt_every=3"]
    run_aerie("train", *common, *train)
    assert (run_dir / "final").is_dir()
    run_aerie("export", *common, "export.format=vllm")
    assert (run_dir / "export" / "vllm" / "config.json").is_file()
    run_aerie("eval", *common, "engine=vllm", "eval.max_prompts=2", "eval.max_new_tokens=16")
    summary = json.loads((run_dir / "eval" / "summary.json").read_text())
    (result,) = summary["results"]
    assert summary["engine"] == "vllm" and result["num_speculative_tokens"] == 3
    assert result["num_verify_steps"] > 0 and result["tau"] >= 1.0 and result["speedup_source"] == "measured"
