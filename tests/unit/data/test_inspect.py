"""Inspect: highlighted sample (markers and ANSI) and dataset statistics."""
import io
import json

import datasets

from data.inspect import dataset_stats, format_sample, run_inspect
from data.sources import DataConfig


def test_format_sample_markers_and_colour(tokenizer):
    ids = tokenizer("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n",
                    add_special_tokens=False)["input_ids"]
    trained = tokenizer("hello<|im_end|>", add_special_tokens=False)["input_ids"]
    start = len(ids) - 1 - len(trained)
    mask = [0] * start + [1] * len(trained) + [0]
    text = format_sample(tokenizer, ids, mask, colour=False)
    assert text.endswith("assistant\n[[hello<|im_end|>]]\n") and text.count("[[") == 1
    assert "\033[1;32mhello<|im_end|>\033[0m" in format_sample(tokenizer, ids, mask, colour=True)


def test_stats_and_run_inspect(tokenizer, tmp_path):
    ds = datasets.Dataset.from_dict({"length": [2, 4, 10], "loss_mask": [[0, 1], [1, 1, 0, 0], [1] * 10]})
    stats = dataset_stats(ds)
    assert stats["num_samples"] == 3 and stats["num_tokens"] == 16 and stats["num_masked_tokens"] == 13
    assert stats["p50"] == 4 and stats["max_length"] == 10
    rows = [{"id": f"r{i}",
             "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}]}
            for i in range(3)]
    (tmp_path / "r.jsonl").write_text("\n".join(map(json.dumps, rows)))
    out = io.StringIO()
    cfg = DataConfig(source="openai", path=str(tmp_path / "r.jsonl"), cache_dir=str(tmp_path / "cache"))
    result = run_inspect(cfg, tokenizer, num_samples=1, colour=False, out=out)
    assert "[[a b<|im_end|>]]" in out.getvalue() and "train: num_samples=3" in out.getvalue()
    assert result["eval"]["num_samples"] == 0
