"""Sources: every file format, the truncated JSON array, skip reasons, strict mode, splits."""
import json
import os

import pytest

from data.sources import DataConfig, SkipReport, iter_json_array, load_conversations, split_train_eval
from tests.helpers import TINY_CHAT

GOOD = {"id": "a", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}


def sharegpt(i, *turns):
    return {"id": f"s{i}", "conversations": [{"from": r, "value": v} for r, v in turns]}


def write(path, text, mode="w"):
    with open(path, mode) as f:
        f.write(text)
    return str(path)


def test_sharegpt_json_skips_and_counts(tmp_path):
    rows = [sharegpt(0, ("system", "be nice"), ("human", "q"), ("gpt", "a")),
            sharegpt(1, ("human", "q"), ("robot", "a")),                       # bad role
            sharegpt(2, ("human", "q"), ("gpt", "  ")),                        # empty turn
            sharegpt(3, ("human", "q"), ("human", "q2"), ("gpt", "a")),        # non alternating
            sharegpt(4, ("human", "x" * 50), ("gpt", "a")),                    # too long
            # trimmed both ends
            sharegpt(5, ("gpt", "leftover"), ("human", "q"), ("gpt", "a"), ("human", "bye")),
            sharegpt(6, ("human", "q")),                                       # nothing to train on
            sharegpt(7, ("human", "\ud800bad"), ("gpt", "a"))]                 # lone surrogate -> not UTF-8
    path = write(tmp_path / "c.json", json.dumps(rows, indent=2))
    records, report = load_conversations(DataConfig(source="sharegpt", path=path, max_chars=40))
    assert [r["id"] for r in records] == ["s0", "s5"]
    assert records[0]["messages"][0] == {"role": "system", "content": "be nice"}
    assert [m["role"] for m in records[1]["messages"]] == ["user", "assistant"]
    assert report.counts == {"bad_role": 1, "empty_turn": 1, "non_alternating": 1, "too_long": 1,
                             "no_assistant_turn": 1, "non_utf8": 1}
    assert report.num_read == 8 and "skipped 6" in report.summary()
    with pytest.raises(ValueError, match=r"c\.json: record 1 \(line \d+\).*bad_role"):
        load_conversations(DataConfig(source="sharegpt", path=path, strict=True))


def test_truncated_json_array_keeps_complete_records(tmp_path):
    text = json.dumps([sharegpt(i, ("human", f"q{i}"), ("gpt", f"a{i}")) for i in range(5)], indent=2)
    path = write(tmp_path / "cut.json", text[: text.rindex('"a4"') - 3])  # cut inside the last record
    report = SkipReport()
    # tiny chunks: refills mid-record
    values = [v for v, _, _ in iter_json_array(path, report, chunk_chars=64)]
    assert [v["id"] for v in values] == ["s0", "s1", "s2", "s3"]
    assert "cut off inside record 4" in report.notes[0]
    records, report = load_conversations(DataConfig(source="sharegpt", path=path))
    assert len(records) == 4 and report.counts == {} and report.notes


def test_non_utf8_bytes_in_json_array_and_jsonl(tmp_path):
    good = json.dumps(GOOD).encode()
    bad = json.dumps(sharegpt(9, ("human", "QQ"), ("gpt", "a"))).encode().replace(b"QQ", b"\xff\xfe")
    path = write(tmp_path / "b.json", b"[" + good + b",\n" + bad + b"]", "wb")
    records, report = load_conversations(DataConfig(source="sharegpt", path=path))
    assert len(records) == 1 and report.counts == {"non_utf8": 1}
    path = write(tmp_path / "b.jsonl", good + b"\n" + bad + b"\n{not json\n", "wb")
    records, report = load_conversations(DataConfig(source="sharegpt", path=path))
    assert len(records) == 1 and report.counts == {"non_utf8": 1, "invalid_json": 1}
    with pytest.raises(ValueError, match=r"b\.jsonl:2: .*non_utf8"):
        load_conversations(DataConfig(source="sharegpt", path=path, strict=True))


def test_openai_ultrachat_and_auto_json(tmp_path):
    openai = [{"id": "o1",
               "messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]},
              {"messages": [{"role": "assistant", "content": "only"}]}]
    ultra = [{"id": "u1", "data": ["q1", "a1", "q2", "a2"]},
             {"prompt_id": "u2", "messages": openai[0]["messages"]}]
    p1 = write(tmp_path / "o.jsonl", "\n".join(map(json.dumps, openai)))
    p2 = write(tmp_path / "u.jsonl", "\n".join(map(json.dumps, ultra)))
    records, report = load_conversations(DataConfig(source="openai", path=p1))
    assert [r["id"] for r in records] == ["o1"] and report.counts == {"no_assistant_turn": 1}
    records, _ = load_conversations(DataConfig(source="ultrachat", path=p2))
    assert [r["id"] for r in records] == ["u1", "u2"]
    assert [m["role"] for m in records[0]["messages"]] == ["user", "assistant"] * 2
    os.makedirs(tmp_path / "mixed")
    write(tmp_path / "mixed" / "a.jsonl", json.dumps(GOOD))
    write(tmp_path / "mixed" / "b.jsonl", json.dumps(ultra[0]))
    records, _ = load_conversations(DataConfig(source="json", path=str(tmp_path / "mixed")))
    assert [r["id"] for r in records] == ["a", "u1"]


def test_datasets_loader_and_disk(tmp_path):
    import datasets

    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                         {"role": "assistant", "content": f"a{i}"}]} for i in range(4)]
    path = write(tmp_path / "rows.jsonl", "\n".join(map(json.dumps, rows)))
    records, _ = load_conversations(DataConfig(source="hf", path="json", data_files=[path], split="train"))
    assert [r["id"] for r in records] == ["r0", "r1", "r2", "r3"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "disk"))
    records, _ = load_conversations(DataConfig(source="disk", path=str(tmp_path / "disk")))
    assert records[2]["messages"][1]["content"] == "a2"
    with pytest.raises(ValueError, match="data.split 'test'"):
        load_conversations(DataConfig(source="disk", path=str(tmp_path / "disk"), split="test"))


def test_splits(tmp_path):
    records = [{"id": f"r{i}", "messages": []} for i in range(20)]
    ids = write(tmp_path / "heldout.json", json.dumps(["r3", "r7"]))
    train, evals = split_train_eval(records, DataConfig(heldout_ids_path=ids, max_samples=5))
    assert ([r["id"] for r in evals] == ["r3", "r7"]
            and [r["id"] for r in train] == ["r0", "r1", "r2", "r4", "r5"])
    train, evals = split_train_eval(records, DataConfig(eval_fraction=0.25, seed=1))
    assert len(evals) == 5 and len(train) == 15 and not {r["id"] for r in train} & {r["id"] for r in evals}
    assert split_train_eval(records, DataConfig(eval_fraction=0.25, seed=1))[1] == evals


@pytest.mark.slow
def test_builtin_sharegpt_package():
    records, report = load_conversations(DataConfig(max_chars=10 ** 9))
    # the package file decodes 17,671 complete records
    assert len(records) > 15000 and report.num_read == 17671
    assert any("cut off inside record 17671" in n for n in report.notes)
    heldout = json.load(open(f"{TINY_CHAT}/heldout_ids.json"))
    train, evals = split_train_eval(records, DataConfig(
        heldout_ids_path=f"{TINY_CHAT}/heldout_ids.json"))
    assert 0 < len(evals) <= len(heldout) and not {r["id"] for r in train} & set(heldout)


def test_media_records_keep_paths_resolved(tmp_path):
    sub = tmp_path / "set"
    sub.mkdir()
    rows = [{"id": "v1", "images": ["img/a.png", "/abs/b.png"],
             "messages": [{"role": "user", "content": "<image> what?"},
                          {"role": "assistant", "content": "a cat"}]},
            {"id": "v2",
             "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    path = write(sub / "vl.jsonl", "\n".join(json.dumps(r) for r in rows))
    records, _ = load_conversations(DataConfig(source="json", path=path, allow_media_outside_root=True),
                                    media_path_keys=("images",))
    assert records[0]["images"] == [str(sub / "img" / "a.png"), "/abs/b.png"]
    assert "images" not in records[1] and records[1]["messages"][1]["content"] == "yo"
    rooted, _ = load_conversations(DataConfig(source="json", path=path, media_root="/data",
                                              allow_media_outside_root=True),
                                   media_path_keys=("images",))
    assert rooted[0]["images"][0] == "/data/img/a.png"

    raw_rows = [{"id": "u1", "audio": "a.wav", "transcript": "hello"}, [1, 2],
                {"text": "hi", "speech_tokens": [1]}]
    raw_path = write(sub / "asr.jsonl", "\n".join(json.dumps(r) for r in raw_rows))
    raw, report = load_conversations(DataConfig(source="json", path=raw_path), "raw", ("audio",))
    assert raw[0] == {"id": "u1", "audio": str(sub / "a.wav"), "transcript": "hello"}
    assert raw[1]["id"] == "asr.jsonl:2" and raw[1]["speech_tokens"] == [1]
    assert report.counts == {"not_an_object": 1}
    with pytest.raises(ValueError, match=r"asr\.jsonl:2.*not_an_object"):
        load_conversations(DataConfig(source="json", path=raw_path, strict=True), "raw", ("audio",))
