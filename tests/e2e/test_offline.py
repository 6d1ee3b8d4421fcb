"""`aerie dump` then offline `aerie train`: the store replaces the target in the loop."""
import json

import pytest

from tests.helpers import TINY_TRAIN_OVERRIDES, read_metrics, run_aerie

pytestmark = pytest.mark.slow


def _common(run_dir, cache):
    return [f"run_dir={run_dir}", f"data.cache_dir={cache}", *TINY_TRAIN_OVERRIDES, "trainer.max_steps=4"]


def test_offline_full_store_matches_online(tmp_path, data_cache):
    """Same data, same batches: offline losses from the lossless store equal the online ones (bf16
    storage)."""
    online, offline = tmp_path / "online", tmp_path / "offline"
    run_aerie("train", *_common(online, data_cache))
    run_aerie("dump", *_common(offline, data_cache), "store.layout=full")
    assert (offline / "store" / "train" / "manifest.json").is_file()
    run_aerie("train", *_common(offline, data_cache), "store.layout=full", "trainer.mode=offline")
    a, b = read_metrics(online), read_metrics(offline)
    assert [m["step"] for m in a] == [m["step"] for m in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=2e-3), x["step"]
        assert y["num_tokens"] == x["num_tokens"]
    assert (offline / "final" / "model.safetensors").is_file()


def test_offline_compact_store_trains(tmp_path, data_cache):
    run_dir = tmp_path / "run"
    run_aerie("dump", *_common(run_dir, data_cache), "store.layout=compact")
    manifest = json.loads((run_dir / "store" / "train" / "manifest.json").read_text())
    assert manifest["version"] == 2 and manifest["topk"] == 8 and manifest["tail_samples"] == 36
    out = run_aerie("train", *_common(run_dir, data_cache), "trainer.mode=offline", "trainer.eval_every=2")
    metrics = read_metrics(run_dir)
    assert metrics[-1]["loss"] < metrics[0]["loss"] and "eval_loss" in metrics[1]
    assert "draft written to" in out.stdout


def test_offline_without_store_names_it(tmp_path, data_cache):
    proc = run_aerie("train", *_common(tmp_path / "run", data_cache), "trainer.mode=offline", check=False)
    assert proc.returncode != 0 and "no hidden-state store" in proc.stderr
