"""`aerie train` through the modality adapters: Qwen2.5-VL images, Qwen2-Audio ASR and a speech-token TTS
LM."""
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.helpers import REPO, TINY_CHAT, read_metrics, run_aerie
from tools.config import register_configs

pytestmark = pytest.mark.slow

SMALL = ["data.max_length=160", "trainer.max_tokens_per_batch=320", "draft.draft_vocab_size=512",
         "draft.ttt_steps=3", "trainer.warmup_steps=1", "trainer.lr=1e-3", "trainer.eval_every=0",
         "logger.progress=false", "target.dtype=float32"]
ONE_RANK = SimpleNamespace(rank=0, world_size=1, is_main=True)


def write_jsonl(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def vl_data(tmp_path_factory):
    """Conversations with 0-2 images each (relative paths, resolved against the data file's directory)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("vl_data")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(56, 84), (84, 56), (56, 56)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / "img" / f"{i}.png")
    rows = []
    for i in range(12):
        images = [f"img/{j % 3}.png" for j in range(i, i + i % 3)]
        markers = " ".join("<image>" for _ in images)
        rows.append({"id": f"v{i}", "images": images, "messages": [
            {"role": "user", "content": f"{markers} Describe picture {i}, please."},
            {"role": "assistant", "content": f"It shows pattern number {i} in several colours."}]})
    return write_jsonl(root / "vl.jsonl", rows)


def _vision_overrides(vl_target_dir, vl_data, run_dir, cache):
    return [f"target.path={vl_target_dir[0]}", "target.modality=vision", "modality=vision",
            "data.source=json", f"data.path={vl_data}", f"run_dir={run_dir}",
            f"data.cache_dir={cache}", *SMALL]


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="train", overrides=overrides)


def test_vision_batches_give_the_draft_mrope_positions(vl_target_dir, vl_data, tmp_path, hydra_restore):
    from trainer.inputs import build_train_data

    cfg = _compose(_vision_overrides(vl_target_dir, vl_data, tmp_path / "run", tmp_path / "cache"))
    data = build_train_data(cfg, ONE_RANK, {})
    target = data.target
    image_id = target.module.config.image_token_id
    seen_image = False
    for _ in range(4):
        batch = next(data.train_batches)
        num_images = int(((batch["input_ids"] == image_id).int().diff(dim=1, prepend=torch.zeros_like(
            batch["input_ids"][:, :1])) == 1).sum())
        assert ("image_grid_thw" in batch) == (num_images > 0)
        if num_images:
            seen_image = True
            assert batch["image_grid_thw"].shape[0] == num_images
            out = target(batch, torch.arange(8))
            assert out.position_ids.shape == (3, *batch["input_ids"].shape)
            # vLLM's Eagle3 proposer embeds the placeholder ids for the draft
            assert out.inputs_embeds is None
    assert seen_image
    # so the draft applies M-RoPE to those positions
    assert data.spec.rope_scaling["mrope_section"] == [2, 3, 3]


def test_vision_trains_and_exports_for_vllm(vl_target_dir, vl_data, tmp_path):
    run_dir = tmp_path / "run"
    common = _vision_overrides(vl_target_dir, vl_data, run_dir, tmp_path / "cache")
    run_aerie("train", *common, "trainer.max_steps=4")
    metrics = read_metrics(run_dir)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4] and all(np.isfinite(m["loss"]) for m in metrics)
    run_aerie("export", *common, "export.format=vllm")
    config = json.loads((run_dir / "export" / "vllm" / "config.json").read_text())
    assert config["architectures"] == ["Eagle3Qwen2_5vlForCausalLM"]
    assert config["rope_scaling"]["mrope_section"] == [2, 3, 3]


def test_audio_trains_on_transcripts(audio_target_dir, tmp_path):
    import soundfile

    data_dir = tmp_path / "asr"
    data_dir.mkdir()
    rows = []
    for i in range(6):
        t = np.arange(16000 * (1 + i % 2)) / 16000.0
        soundfile.write(str(data_dir / f"{i}.wav"),
                        (0.2 * np.sin(2 * np.pi * (200 + 50 * i) * t)).astype(np.float32), 16000)
        rows.append({"id": f"u{i}", "audio": f"{i}.wav", "transcript": f"this is utterance number {i}"})
    path = write_jsonl(data_dir / "asr.jsonl", rows)
    run_dir = tmp_path / "run"
    run_aerie("train", f"target.path={audio_target_dir[0]}", "target.modality=audio", "modality=audio",
              "data.source=json", f"data.path={path}", f"run_dir={run_dir}",
              f"data.cache_dir={tmp_path / 'cache'}", *SMALL, "trainer.max_steps=3")
    metrics = read_metrics(run_dir)
    assert len(metrics) == 3 and all(np.isfinite(m["loss"]) for m in metrics)
    assert (run_dir / "final").is_dir()


def test_speech_tokens_train_over_the_speech_vocabulary(tmp_path):
    from data.vocab import load_vocab

    offset, num_codes, start, end = 7000, 600, 6998, 6999
    rng = np.random.default_rng(0)
    rows = [{"id": f"t{i}", "text": f"say sentence {i}",
             "speech_tokens": rng.integers(0, num_codes, 40).tolist()}
            for i in range(16)]
    path = write_jsonl(tmp_path / "tts.jsonl", rows)
    common = [f"target.path={TINY_CHAT}", "target.modality=speech_tokens", "modality=speech_tokens",
              f"modality.speech_token_offset={offset}", f"modality.num_speech_tokens={num_codes}",
              f"modality.speech_start_id={start}", f"modality.speech_end_id={end}", "data.source=json",
              f"data.path={path}", f"data.cache_dir={tmp_path / 'cache'}", *SMALL,
              "draft.draft_vocab_size=1024", "trainer.max_steps=3"]
    for mode in ("online", "offline"):
        run_dir = tmp_path / mode
        if mode == "offline":
            run_aerie("dump", *common, f"run_dir={run_dir}")
        run_aerie("train", *common, f"run_dir={run_dir}", f"trainer.mode={mode}")
        d2t, t2d, counts, _ = load_vocab(str(run_dir / "vocab.safetensors"))
        ids = torch.arange(d2t.numel()) + d2t
        assert d2t.numel() == num_codes + 1  # clipped to the speech codes and the end marker
        assert set(ids.tolist()) == set(range(offset, offset + num_codes)) | {end}
        assert int(counts[:offset - 2].sum()) == 0  # text prompt tokens are not trained
        assert len(read_metrics(run_dir)) == 3


def test_modality_mismatch_and_offline_media_are_refused(vl_target_dir, tmp_path, hydra_restore):
    from trainer.inputs import build_adapter

    cfg = _compose([f"target.path={vl_target_dir[0]}", "target.modality=vision"])
    with pytest.raises(ValueError, match="add modality=vision"):
        build_adapter(cfg, encode=False)
    cfg = _compose([f"target.path={vl_target_dir[0]}", "target.modality=vision", "modality=vision"])
    with pytest.raises(ValueError, match="trains online only"):
        build_adapter(cfg, encode=False, offline=True)
    proc = run_aerie("dump", f"target.path={vl_target_dir[0]}", "target.modality=vision", "modality=vision",
                     f"run_dir={tmp_path}", check=False)
    assert proc.returncode != 0 and "trains online only" in proc.stderr + proc.stdout
