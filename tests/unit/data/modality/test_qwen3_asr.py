"""Qwen3-ASR adapter: placeholders as Qwen3ASRProcessor counts them, the target forward, sample-rate errors,
export."""
import json

import numpy as np
import pytest
import torch

from data.modality.audio import qwen3_asr_num_audio_tokens
from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft
from models.registry import MODALITIES, TARGETS
from models.targets.base import TargetConfig
from tools.export.base import export

DRAFT_IDS = torch.tensor([1, 5, 200])


def write_wav(path, seconds, rate=16000):
    import soundfile

    t = np.arange(int(seconds * rate)) / rate
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * 330 * t)).astype(np.float32), rate)
    return str(path)


def test_token_count_matches_the_processor():
    from transformers import Qwen3ASRProcessor

    frames = torch.tensor([1, 37, 99, 100, 101, 250, 1000, 1234])
    expected = Qwen3ASRProcessor._get_audio_token_length(None, frames, 50).tolist()
    assert [qwen3_asr_num_audio_tokens(int(n), 50) for n in frames] == expected


def test_qwen3_asr_forward_matches_hf_and_exports(qwen3_asr_target_dir, tmp_path):
    path, tokenizer, extractor = qwen3_asr_target_dir
    target = TARGETS.get("hf").load(TargetConfig(path=path, dtype="float32", aux_layer_ids=[1, 2, 3],
                                                 modality="qwen3_asr"))
    adapter = MODALITIES.get("qwen3_asr")(None, tokenizer, extractor)
    encoded = [adapter.encode({"id": f"u{i}", "audio": write_wav(tmp_path / f"{i}.wav", s),
                               "transcript": "hi there"})
               for i, s in enumerate((1.3, 0.6))]
    audio_id = target.module.config.audio_token_id
    num_frames = [int(e["input_features_mask"].sum()) for e in encoded]
    assert num_frames == [130, 60]
    assert [sum(t == audio_id for t in e["input_ids"]) for e in encoded] == [17, 8]  # 13 + 4 and 8
    batch = adapter.collate(encoded)
    out = target(batch, DRAFT_IDS)
    for row, sample in enumerate(encoded):  # the padded batch row gives the single sample's states
        ids = torch.tensor([sample["input_ids"]])
        ref = target.module(input_ids=ids, input_features=sample["input_features"],
                            input_features_mask=sample["input_features_mask"], output_hidden_states=True)
        n = ids.shape[1]
        torch.testing.assert_close(out.aux_hidden_states[row:row + 1, :n],
                                   torch.cat([ref.hidden_states[i] for i in (1, 2, 3)], -1),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.teacher_logits[row:row + 1, :n], ref.logits.float()[..., DRAFT_IDS],
                                   atol=1e-5, rtol=1e-5)
    draft = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=64), target.spec)
    draft.load_embedding(target.embed_tokens_weight())
    export(draft, tmp_path / "vllm", "vllm", target=target.spec, dtype="float32")
    config = json.loads((tmp_path / "vllm" / "config.json").read_text())
    # vLLM: Qwen3ASRForConditionalGeneration is SupportsEagle3
    assert config["architectures"] == ["Eagle3LlamaForCausalLM"]


def test_wrong_sample_rate_and_missing_audio_name_the_row(qwen3_asr_target_dir, tmp_path):
    _, tokenizer, extractor = qwen3_asr_target_dir
    adapter = MODALITIES.get("qwen3_asr")(None, tokenizer, extractor)
    wav = write_wav(tmp_path / "a.wav", 0.5, rate=8000)
    with pytest.raises(ValueError, match=r"sample r1: audio .*a\.wav' is sampled at 8000 Hz but the row says "
                                         r"sampling_rate=16000"):
        adapter.encode({"id": "r1", "audio": wav, "transcript": "x", "sampling_rate": 16000})
    assert adapter.encode({"id": "r2", "audio": wav, "transcript": "x", "sampling_rate": 8000})["input_ids"]
    with pytest.raises(ValueError, match=r"sample r3: cannot read audio .*nope\.wav"):
        adapter.encode({"id": "r3", "audio": str(tmp_path / "nope.wav"), "transcript": "x"})
