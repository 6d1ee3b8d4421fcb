import pytest

from models.registry import DRAFTS, MODALITIES, TARGETS, Registry
from tools.export.base import EXPORTS


def test_register_and_get():
    reg = Registry("widget", {})

    @reg.register("a")
    class A:
        pass

    assert reg.get("a") is A
    assert "a" in reg and reg.names() == ["a"]


def test_duplicate_name_rejected():
    reg = Registry("widget", {})
    reg.register("a")(object)
    with pytest.raises(ValueError, match="widget 'a' is already registered"):
        reg.register("a")(int)


def test_unknown_name_lists_available():
    with pytest.raises(ValueError, match=r"unknown draft architecture 'nope'; available: .*eagle3_llama"):
        DRAFTS.get("nope")


def test_builtin_name_cannot_be_taken_by_another_module():
    with pytest.raises(ValueError, match="built-in name"):
        TARGETS.register("hf")(type("Impostor", (), {}))


def test_builtins_load_lazily_by_name():
    assert TARGETS.get("hf").__name__ == "HFTargetModel"
    assert DRAFTS.get("eagle3_llama").__name__ == "Eagle3LlamaDraft"
    assert set(MODALITIES.names()) >= {"text", "vision", "audio", "speech_tokens"}
    for name in ("text", "vision", "audio", "speech_tokens"):
        assert MODALITIES.get(name).config_class is not None
    assert set(EXPORTS.names()) >= {"vllm", "sglang", "speculators"}
