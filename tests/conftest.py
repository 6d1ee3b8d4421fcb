"""Shared fixtures: a session data cache, tiny multimodal targets with media files, and Hydra state restored
after each test (helpers that are not fixtures: tests/helpers.py)."""
import numpy as np
import pytest
import torch

from tests.helpers import TINY_CHAT


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One tokenised-data cache for the whole session, so each training run re-tokenises nothing."""
    return tmp_path_factory.mktemp("aerie_cache")


@pytest.fixture
def hydra_restore():
    """Clear Hydra's global state after a test that composes configs in-process."""
    from hydra.core.global_hydra import GlobalHydra

    yield
    GlobalHydra.instance().clear()


# ---- tiny Qwen2.5-VL / Qwen2-Audio targets (random weights, processors saved alongside) and media files ----
VISION_TOKENS = ["<|vision_start|>", "<|image_pad|>", "<|vision_end|>"]
AUDIO_TOKENS = ["<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]


def tokenizer_with(tokens):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(TINY_CHAT))
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
    processor.save_pretrained(str(path))
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
    extractor = WhisperFeatureExtractor(feature_size=80)
    extractor.save_pretrained(str(path))
    return str(path), tokenizer, extractor


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


@pytest.fixture(scope="session")
def qwen3_vl_target_dir(tmp_path_factory):
    """A tiny Qwen3-VL (interleaved M-RoPE, DeepStack after decoder layers 0 and 1), random weights."""
    from transformers import Qwen2VLImageProcessorPil, Qwen3VLConfig, Qwen3VLForConditionalGeneration

    path = tmp_path_factory.mktemp("tiny_qwen3_vl")
    tokenizer = tokenizer_with(VISION_TOKENS)
    ids = tokenizer.convert_tokens_to_ids(VISION_TOKENS)
    tc = dict(text_config(len(tokenizer)), head_dim=16, tie_word_embeddings=False,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                               "mrope_interleaved": True})
    config = Qwen3VLConfig(
        text_config=tc, vision_start_token_id=ids[0], image_token_id=ids[1], vision_end_token_id=ids[2],
        tie_word_embeddings=False,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=16, spatial_merge_size=2, temporal_patch_size=2,
                           num_position_embeddings=64, deepstack_visual_indexes=[0, 1]))
    torch.manual_seed(0)
    model = Qwen3VLForConditionalGeneration(config)
    # logits std ~4 instead of ~0.16: a peaked teacher whose greedy answers can be learnt
    with torch.no_grad():
        model.lm_head.weight.mul_(25)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    processor = Qwen2VLImageProcessorPil(patch_size=16, merge_size=2, temporal_patch_size=2,
                                         min_pixels=64 * 64, max_pixels=128 * 128)
    processor.save_pretrained(str(path))
    return str(path), tokenizer, processor


QWEN3_ASR_TOKENS = ["<|audio_start|>", "<|audio_pad|>", "<|audio_end|>"]


@pytest.fixture(scope="session")
def qwen3_asr_target_dir(tmp_path_factory):
    """A tiny Qwen3-ASR (chunked conv audio tower + Qwen3 decoder), random weights."""
    from transformers import (
        AutoTokenizer,
        Qwen3ASRConfig,
        Qwen3ASRFeatureExtractor,
        Qwen3ASRForConditionalGeneration,
    )

    path = tmp_path_factory.mktemp("tiny_qwen3_asr")
    named = dict(zip(("audio_bos_token", "audio_token", "audio_eos_token"), QWEN3_ASR_TOKENS))
    # as Qwen3ASRProcessor reads
    tokenizer = AutoTokenizer.from_pretrained(str(TINY_CHAT), extra_special_tokens=named)
    config = Qwen3ASRConfig(
        text_config=dict(model_type="qwen3", head_dim=16, **text_config(len(tokenizer))),
        audio_config=dict(d_model=32, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=64,
                          num_mel_bins=128, downsample_hidden_size=8, output_dim=64),
        audio_token_id=tokenizer.convert_tokens_to_ids("<|audio_pad|>"), tie_word_embeddings=False)
    torch.manual_seed(0)
    model = Qwen3ASRForConditionalGeneration(config)
    with torch.no_grad():  # a peaked teacher, as for the tiny Qwen3-VL
        model.lm_head.weight.mul_(25)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    extractor = Qwen3ASRFeatureExtractor()
    extractor.save_pretrained(str(path))
    return str(path), tokenizer, extractor
