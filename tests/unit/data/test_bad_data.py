"""Bad data files: each a one-line ValueError naming file and line under data.strict=true, counted per reason
and skipped otherwise; and a data cache that survives a kill during tokenisation."""
import json
import os
import subprocess
import sys

import pytest

from data.dataset import build_tokenized_datasets, dataset_fingerprint, default_cache_dir
from data.sources import DataConfig, load_conversations

ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def _rows(n, **extra):
    return [{"id": f"c{i}", **ROW, **extra} for i in range(n)]


def _cfg(path, **kw):
    return DataConfig(source="json", path=str(path), **kw)


@pytest.mark.parametrize("content", [b"", b"  \n\t\n"])
def test_empty_file(tmp_path, tokenizer, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=f"^{path}: empty file"):
        load_conversations(_cfg(path, strict=True))
    records, report = load_conversations(_cfg(path))
    assert records == [] and report.counts == {"empty_file": 1}
    with pytest.raises(ValueError) as err:  # not "raise trainer.max_tokens_per_batch or add data"
        build_tokenized_datasets(_cfg(path, cache_dir=str(tmp_path / "cache")), tokenizer)
    assert str(path) in str(err.value) and "no usable training conversation" in str(err.value)
    assert "max_tokens_per_batch" not in str(err.value)


@pytest.mark.parametrize("name,text", [("rows.jsonl", "\n".join(json.dumps(r) for r in _rows(3))),
                                       ("rows.json", json.dumps(_rows(3), indent=1))])
def test_utf8_bom_is_accepted(tmp_path, name, text):
    path = tmp_path / name
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    records, report = load_conversations(_cfg(path, strict=True))
    assert [r["id"] for r in records] == ["c0", "c1", "c2"] and not report.counts


def test_json_object_file_is_named_as_such(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps({"data": _rows(5)}, indent=2))
    with pytest.raises(ValueError,
                       match="line 1: the file is one JSON object; its key 'data' holds a list of 5"):
        load_conversations(_cfg(path, strict=True))
    records, report = load_conversations(_cfg(path))
    assert records == [] and report.counts == {"json_object_file": 1}  # not 5 x 88 lines of invalid_json


def test_duplicate_ids_are_detected(tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = _rows(3) + [{"id": "c1", **ROW}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=f"{path}:4: id 'c1' \\(first at {path}:2\\).*duplicate_id"):
        load_conversations(_cfg(path, strict=True))
    records, report = load_conversations(_cfg(path))
    assert [r["id"] for r in records] == ["c0", "c1", "c2"] and report.counts == {"duplicate_id": 1}


def test_truncated_json_array_fails_strict(tmp_path):
    path = tmp_path / "rows.json"
    path.write_text(json.dumps(_rows(4), indent=1)[:-60])
    with pytest.raises(ValueError, match=f"{path}: line \\d+: file cut off inside record 3"):
        load_conversations(_cfg(path, strict=True))
    records, report = load_conversations(_cfg(path))
    assert len(records) == 3 and "cut off" in report.notes[0]


@pytest.mark.parametrize("image", ["../../../../etc/passwd", "/etc/passwd"])
def test_media_paths_are_confined(tmp_path, image):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps({"id": "x", **ROW, "image": image}) + "\n" + json.dumps({"id": "y", **ROW}))
    with pytest.raises(ValueError, match=f"{path}:1: image path .* leaves .*allow_media_outside_root"):
        load_conversations(_cfg(path, strict=True), media_path_keys=("image",))
    records, report = load_conversations(_cfg(path), media_path_keys=("image",))
    assert [r["id"] for r in records] == ["y"] and report.counts == {"media_outside_root": 1}
    allowed, _ = load_conversations(_cfg(path, allow_media_outside_root=True), media_path_keys=("image",))
    assert os.path.realpath(allowed[0]["image"]) == "/etc/passwd"


def test_stale_tokenisation_dir_of_a_killed_run_is_removed(tmp_path, tokenizer):
    path = tmp_path / "rows.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in _rows(4)))
    cfg = _cfg(path, cache_dir=str(tmp_path / "cache"))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True)
    cache = os.path.join(default_cache_dir(cfg), dataset_fingerprint(cfg, tokenizer))
    stale = os.path.join(cache, f"train.tmp{dead.stdout.strip()}")  # what a kill during tokenisation leaves
    os.makedirs(stale)
    open(os.path.join(stale, "data-00000-of-00001.arrow"), "wb").close()
    train, _ = build_tokenized_datasets(cfg, tokenizer)
    assert len(train) == 4 and not os.path.exists(stale)
    assert sorted(os.listdir(cache)) == ["done.json", "eval", "train"]
