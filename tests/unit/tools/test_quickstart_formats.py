"""The quickstart exports a draft only to the engines that serve it (SGLang: no DFlash, no EAGLE 3.1
switches)."""
from models.draft.dflash import DFlashConfig, DFlashDraft
from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft
from tests.helpers import make_spec
from tools.export.base import EXPORTS
from tools.quickstart import quickstart_formats


def test_formats_follow_what_each_engine_serves():
    spec = make_spec()
    eagle3 = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=128), spec).config
    eagle3_1 = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=128, fc_norm=True, norm_output=True),
                                            spec).config
    dflash = DFlashDraft.from_target(DFlashConfig(draft_vocab_size=128), spec).config
    assert quickstart_formats("eagle3_llama", eagle3) == ["vllm", "sglang"]
    assert quickstart_formats("eagle3_llama", eagle3_1) == ["vllm"]
    assert quickstart_formats("dflash", dflash) == ["vllm"]
    assert "dflash" not in EXPORTS.get("sglang").layouts  # what the quickstart used to fail on
    assert "no EAGLE 3.1 switches" in EXPORTS.get("sglang").refusal("eagle3_llama", eagle3_1)
