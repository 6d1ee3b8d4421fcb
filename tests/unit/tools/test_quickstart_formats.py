"""The quickstart exports a draft only to the engines that serve its architecture (SGLang: no DFlash)."""
from tools.export.base import EXPORTS
from tools.quickstart import quickstart_formats


def test_formats_follow_what_each_engine_serves():
    assert quickstart_formats("eagle3_llama") == ["vllm", "sglang"]
    assert quickstart_formats("dflash") == ["vllm"]
    assert "dflash" not in EXPORTS.get("sglang").layouts  # what the quickstart used to fail on
