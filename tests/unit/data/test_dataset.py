"""Tokenised datasets: columns, eval split, truncation drop, on-disk cache reuse keyed by the fingerprint."""
import json

from data.dataset import build_tokenized_datasets, dataset_fingerprint
from data.sources import DataConfig


def write_rows(path, n):
    rows = [{"id": f"r{i}", "messages": [{"role": "user", "content": f"question {i} " * (1 + i % 3)},
                                         {"role": "assistant", "content": f"answer {i}"}]} for i in range(n)]
    path.write_text("\n".join(map(json.dumps, rows)))
    return str(path)


def test_build_and_cache(tokenizer, tmp_path, capsys):
    path = write_rows(tmp_path / "rows.jsonl", 12)
    cfg = DataConfig(source="openai", path=path, eval_fraction=0.25, max_length=64, num_proc=2,
                     cache_dir=str(tmp_path / "cache"))
    train, evals = build_tokenized_datasets(cfg, tokenizer)
    assert len(train) == 9 and len(evals) == 3
    assert set(train.column_names) == {"id", "input_ids", "loss_mask", "length"}
    row = train[0]
    assert row["length"] == len(row["input_ids"]) == len(row["loss_mask"]) and 0 < sum(row["loss_mask"])
    assert "read 12 rows" in capsys.readouterr().out
    again_train, again_eval = build_tokenized_datasets(cfg, tokenizer)
    assert "read" not in capsys.readouterr().out  # served from the cache, source not re-read
    assert again_train["input_ids"] == train["input_ids"] and again_eval["id"] == evals["id"]
    single = DataConfig(**{**cfg.__dict__, "num_proc": 1})
    assert dataset_fingerprint(single, tokenizer) == dataset_fingerprint(cfg, tokenizer)
    changed = DataConfig(**{**cfg.__dict__, "max_length": 8})
    assert dataset_fingerprint(changed, tokenizer) != dataset_fingerprint(cfg, tokenizer)
    short_train, short_eval = build_tokenized_datasets(changed, tokenizer)
    assert len(short_train) + len(short_eval) == 0  # the first assistant token lies beyond 8 tokens
    assert "dropped 12 conversations" in capsys.readouterr().out
