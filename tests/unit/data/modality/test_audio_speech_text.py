"""Audio (Qwen2-Audio ASR), speech-token (TTS) and text adapters end to end on tiny targets."""
import pytest
import torch

from models.registry import MODALITIES, TARGETS
from models.targets.base import TargetConfig
from tests.helpers import TINY_CHAT

DRAFT_IDS = torch.tensor([1, 5, 200])


def test_audio_forward_matches_hf(audio_target_dir, wav_path):
    path, tokenizer, extractor = audio_target_dir
    target = TARGETS.get("hf").load(TargetConfig(path=path, dtype="float32", aux_layer_ids=[1, 2, 3],
                                                 modality="audio"))
    adapter = MODALITIES.get("audio")(None, tokenizer, extractor)
    enc = adapter.encode({"id": "u1", "audio": wav_path, "transcript": "hello world"})
    audio_id = target.module.config.audio_token_id
    assert sum(t == audio_id for t in enc["input_ids"]) == 25  # 100 mel frames -> 50 -> 25
    transcript_ids = [t for t, m in zip(enc["input_ids"], enc["loss_mask"]) if m]
    assert "hello world" in tokenizer.decode(transcript_ids)
    batch = adapter.collate([enc, enc], packed=False)
    out = target(batch, DRAFT_IDS)
    ref = target.module(input_ids=batch["input_ids"][:1], input_features=batch["input_features"][:1],
                        feature_attention_mask=batch["feature_attention_mask"][:1], output_hidden_states=True)
    torch.testing.assert_close(out.aux_hidden_states[:1],
                               torch.cat([ref.hidden_states[i] for i in (1, 2, 3)], -1))
    torch.testing.assert_close(out.teacher_logits[:1], ref.logits.float()[..., DRAFT_IDS])
    assert out.inputs_embeds is None  # the draft embeds the placeholder ids (as vLLM does for Qwen3-ASR)


def test_missing_audio_names_sample_and_path(audio_target_dir, tmp_path):
    _, tokenizer, extractor = audio_target_dir
    adapter = MODALITIES.get("audio")(None, tokenizer, extractor)
    with pytest.raises(ValueError, match=r"sample u9: cannot read audio .*gone\.wav"):
        adapter.encode({"id": "u9", "audio": str(tmp_path / "gone.wav"), "transcript": "x"})


def test_speech_tokens_adapter_trains_only_speech(tmp_path):
    from transformers import AutoTokenizer

    from tests.helpers import save_tiny

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_CHAT))
    cls = MODALITIES.get("speech_tokens")
    adapter = cls(cls.config_class(speech_token_offset=400, num_speech_tokens=100, speech_start_id=398,
                                   speech_end_id=399), tokenizer)
    enc = adapter.encode({"id": "t1", "text": "hi there", "speech_tokens": [0, 5, 99, 7]})
    assert enc["input_ids"][-6:] == [398, 400, 405, 499, 407, 399]
    assert [t for t, m in zip(enc["input_ids"], enc["loss_mask"]) if m] == [400, 405, 499, 407, 399]
    candidates = adapter.draft_vocab_candidates()
    assert candidates.tolist() == [399] + list(range(400, 500))
    with pytest.raises(ValueError, match="sample t2: codec ids"):
        adapter.encode({"id": "t2", "text": "x", "speech_tokens": [100]})
    # a Llama target runs the collated TTS batch (ids must fit the tiny 512 vocab)
    target = TARGETS.get("hf").load(TargetConfig(path=save_tiny(tmp_path / "m", "llama"), dtype="float32",
                                                 aux_layer_ids=[1, 2], modality="speech_tokens"))
    small = dict(enc, input_ids=[t % 512 for t in enc["input_ids"]])
    out = target(adapter.collate([small, small], packed=True, max_tokens=64), candidates)
    assert out.teacher_logits.shape[-1] == 101 and out.inputs_embeds is None


def test_text_adapter_collate_layout():
    from transformers import AutoTokenizer

    adapter = MODALITIES.get("text")(None, AutoTokenizer.from_pretrained(str(TINY_CHAT)))
    enc = [adapter.encode({"id": str(i), "messages": [{"role": "user", "content": "hi " * (i + 1)},
                                                      {"role": "assistant", "content": "ok"}]})
           for i in range(3)]
    assert all(sum(e["loss_mask"]) > 0 for e in enc)
    padded = adapter.collate(enc)
    lengths = [len(e["input_ids"]) for e in enc]
    assert padded["input_ids"].shape == (3, max(lengths))
    assert (padded["document_ids"] >= 0).sum(1).tolist() == lengths
    packed = adapter.collate(enc, packed=True, max_tokens=sum(lengths))
    assert packed["input_ids"].shape == (1, sum(lengths))
    assert packed["document_ids"][0].unique().tolist() == [0, 1, 2]
    assert packed["position_ids"][0, lengths[0]].item() == 0
    with pytest.raises(ValueError, match="messages"):
        adapter.encode({"id": "z"})
