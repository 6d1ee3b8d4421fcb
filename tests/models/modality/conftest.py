"""Tiny Qwen2.5-VL / Qwen2-Audio targets + processors built locally, and media files written by the tests."""
from pathlib import Path
import numpy as np
import pytest
import torch

FIXTURE = str(Path(__file__).resolve().parents[3] / "assets" / "tiny-chat-llama")
VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
AUDIO_TOKENS = ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]


def tokenizer_with(tokens):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(FIXTURE)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    return tokenizer


def text_config(vocab_size):
    return dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6)


@pytest.fixture(scope="session")
def vl_target_dir(tmp_path_factory):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessorPil

    path = tmp_path_factory.mktemp("tiny_vl")
    tokenizer = tokenizer_with(VISION_TOKENS)
    ids = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    tc = text_config(len(tokenizer))
    tc["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    config = Qwen2_5_VLConfig(
        text_config=tc, vision_start_token_id=ids[0], image_token_id=ids[1], vision_end_token_id=ids[2],
        vision_config=dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[0]))
    torch.manual_seed(0)
    Qwen2_5_VLForConditionalGeneration(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    processor = Qwen2VLImageProcessorPil(patch_size=14, merge_size=2, temporal_patch_size=2,
                                         min_pixels=56 * 56, max_pixels=112 * 112)
    return str(path), tokenizer, processor


@pytest.fixture(scope="session")
def audio_target_dir(tmp_path_factory):
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, WhisperFeatureExtractor

    path = tmp_path_factory.mktemp("tiny_audio")
    tokenizer = tokenizer_with(AUDIO_TOKENS)
    config = Qwen2AudioConfig(
        text_config=dict(model_type="qwen2", **text_config(len(tokenizer))),
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=80, max_source_positions=1500),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|AUDIO|>"))
    torch.manual_seed(0)
    Qwen2AudioForConditionalGeneration(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return str(path), tokenizer, WhisperFeatureExtractor(feature_size=80)


@pytest.fixture
def png_path(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    path = tmp_path / "img.png"
    Image.fromarray(rng.integers(0, 255, (56, 84, 3), dtype=np.uint8)).save(path)
    return str(path)


@pytest.fixture
def wav_path(tmp_path):
    import soundfile

    t = np.arange(8000) / 8000.0  # 1 s at 8 kHz: exercises resampling to 16 kHz
    path = tmp_path / "a.wav"
    soundfile.write(str(path), (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32), 8000)
    return str(path)
