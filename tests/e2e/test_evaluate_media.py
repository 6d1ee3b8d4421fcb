"""Multimodal speculative eval: exact on a tiny Qwen3-VL, bad media rows named, and a learnable fixture where
a draft trained on the target's own greedy answers for a small image set drafts well above an untrained
one."""
import json

import numpy as np
import pytest
import torch

from data.modality.vision import mrope_position_ids
from data.sources import DataConfig
from models.draft.eagle3 import DraftConfig, Eagle3LlamaDraft
from models.draft.io import save_aerie_draft
from models.registry import MODALITIES, TARGETS
from models.targets.base import TargetConfig
from tests.helpers import read_metrics, run_aerie
from tools.eval.media import MediaSpeculativeDecoder, load_media_prompts

SIZES = [(64, 64), (64, 96), (96, 64), (64, 128), (128, 64), (96, 96)]


@pytest.fixture(scope="module")
def vl(qwen3_vl_target_dir):
    path, tokenizer, processor = qwen3_vl_target_dir
    target = TARGETS.get("hf").load(TargetConfig(path=path, dtype="float32", modality="vision"))
    adapter = MODALITIES.get("vision")(None, tokenizer, processor, data=DataConfig(max_length=256))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # token-by-token decoding of a tiny model: threads only add contention
    yield target, adapter
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_prompts(tmp_path_factory):
    """A JSONL of prompts over a small image set (relative paths)."""
    from PIL import Image

    root = tmp_path_factory.mktemp("media_prompts")
    rng = np.random.default_rng(0)
    rows = []
    for i, (height, width) in enumerate(SIZES):
        Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(root / f"{i}.png")
        rows.append({"id": f"img{i}", "images": [f"{i}.png"],
                     "messages": [{"role": "user", "content": f"Describe <image> in words, picture {i}."}]})
    path = root / "prompts.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path, rows


def untrained_draft(target, seed=0):
    torch.manual_seed(seed)
    draft = Eagle3LlamaDraft.from_target(DraftConfig(draft_vocab_size=target.spec.vocab_size), target.spec)
    draft.load_embedding(target.embed_tokens_weight())
    return draft.eval()


def test_speculative_output_is_the_targets_greedy_output(vl, image_prompts):
    target, adapter = vl
    prompt = load_media_prompts(str(image_prompts[0]), adapter, max_prompts=2)[1]
    decoder = MediaSpeculativeDecoder(target.module, untrained_draft(target), adapter)
    result = decoder.generate(prompt, max_new_tokens=10, num_speculative_tokens=3)
    ids = torch.tensor([prompt["input_ids"] + result.tokens])
    positions = mrope_position_ids(target.module.model,
                                   {"input_ids": ids, "document_ids": torch.zeros_like(ids),
                                    "image_grid_thw": prompt["image_grid_thw"]})
    with torch.no_grad():
        logits = target.module(input_ids=ids, pixel_values=prompt["pixel_values"], position_ids=positions,
                               image_grid_thw=prompt["image_grid_thw"]).logits
    num_prompt = len(prompt["input_ids"])
    assert logits[0, num_prompt - 1:-1].argmax(-1).tolist() == result.tokens
    assert len(result.accepted) == result.num_target_forwards - 1 > 0


def test_bad_media_rows_are_named(vl, tmp_path, png_path):
    _, adapter = vl
    (tmp_path / "bad.png").write_bytes(b"not a png")
    cases = {
        "missing": ({"images": ["nope.png"], "messages": [{"role": "user", "content": "<image> hi"}]},
                    r"prompts.jsonl:2: sample line 2: cannot read image .*nope\.png"),
        "unreadable": ({"id": "u", "images": ["bad.png"], "messages": [{"role": "user", "content": "x"}]},
                       r"prompts.jsonl:2: sample u: cannot read image .*bad\.png"),
        "placeholders": ({"id": "p", "images": [png_path], "messages": [
            {"role": "user", "content": "<image> and <image>"}]},
            r"prompts.jsonl:2: sample p: 2 <image> markers but 1"),
    }
    good = {"images": [png_path], "messages": [{"role": "user", "content": "fine"}]}
    for row, pattern in cases.values():
        (tmp_path / "prompts.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
        with pytest.raises(ValueError, match=pattern) as err:
            load_media_prompts(str(tmp_path / "prompts.jsonl"), adapter)
        assert "\n" not in str(err.value)


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from tests.helpers import REPO
    from tools.config import register_configs

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return hydra_compose(config_name="train", overrides=overrides)


def audio_prompts(root):
    import soundfile

    rows = []
    for i, seconds in enumerate((0.6, 0.9, 1.2, 0.7, 1.0, 1.4)):
        t = np.arange(int(16000 * seconds)) / 16000
        wave = 0.3 * np.sin(2 * np.pi * (150 + 60 * i) * t) * np.sin(2 * np.pi * (2 + i) * t)
        soundfile.write(str(root / f"{i}.wav"), wave.astype(np.float32), 16000)
        rows.append({"id": f"wav{i}", "audio": f"{i}.wav", "prompt": f"Transcribe clip {i}."})
    return rows


@pytest.mark.slow
@pytest.mark.timeout(1800)  # two CLI processes; a shared, loaded 2-core machine needs the margin
@pytest.mark.parametrize("modality", ["vision", "qwen3_asr"])
def test_trained_draft_drafts_media_well_above_an_untrained_one(modality, image_prompts, qwen3_vl_target_dir,
                                                                qwen3_asr_target_dir, tmp_path, monkeypatch,
                                                                hydra_restore):
    """Regenerate a tiny random target's greedy answers for a small image / audio set, train a draft on them
    with `aerie train`, then run `aerie eval`'s entry point (T=0) through the multimodal target, and the same
    for an untrained draft of the same shape."""
    from tools.eval.run import run_eval

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    if modality == "vision":
        target_dir, (prompts_path, rows) = qwen3_vl_target_dir, image_prompts
    else:
        target_dir, rows = qwen3_asr_target_dir, audio_prompts(tmp_path)
        prompts_path = tmp_path / "prompts.jsonl"
        prompts_path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    path, tokenizer, processor = target_dir
    target = TARGETS.get("hf").load(TargetConfig(path=path, dtype="float32", modality=modality))
    adapter = MODALITIES.get(modality)(None, tokenizer, processor, data=DataConfig(max_length=256))
    decoder = MediaSpeculativeDecoder(target.module, untrained_draft(target), adapter)
    train_rows = []
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # token-by-token decoding of a tiny model: threads only add contention
    try:
        for row, prompt in zip(rows, load_media_prompts(str(prompts_path), adapter)):
            answer = decoder.generate(prompt, max_new_tokens=24, num_speculative_tokens=1).tokens
            text = tokenizer.decode(answer, skip_special_tokens=True)
            if modality == "vision":
                train_rows.append({**row,
                                   "messages": row["messages"] + [{"role": "assistant", "content": text}]})
            else:
                train_rows.append({**row, "transcript": text})
        data = prompts_path.parent / "regen.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in train_rows) + "\n")
        run_dir = tmp_path / "run"
        common = [f"target.path={path}", f"target.modality={modality}", f"modality={modality}",
                  "target.dtype=float32", f"run_dir={run_dir}"]
        run_aerie("train", *common, "data.source=json", f"data.path={data}",
                  f"data.cache_dir={tmp_path / 'cache'}", "data.max_length=160",
                  "trainer.max_tokens_per_batch=320", "draft.draft_vocab_size=1024", "draft.ttt_steps=3",
                  "trainer.warmup_steps=2", "trainer.lr=3e-3", "trainer.eval_every=0",
                  "logger.progress=false", "trainer.max_steps=80")
        assert read_metrics(run_dir)[-1]["step"] == 80
        evals = [f"eval.prompts={prompts_path}", "eval.num_speculative_tokens=3", "eval.max_new_tokens=24"]
        trained = run_eval(compose([*common, *evals]))["results"][0]
        assert (run_dir / "eval" / "acceptance.png").is_file()
        save_aerie_draft(untrained_draft(target, seed=1), tmp_path / "untrained")
        untrained = run_eval(compose([*common, *evals, f"eval.draft={tmp_path / 'untrained'}",
                                      "eval.out_dir="]))
    finally:
        torch.set_num_threads(threads)
    untrained = untrained["results"][0]
    print(f"{modality}: tau trained {trained['tau']:.2f} vs untrained {untrained['tau']:.2f}; "
          f"per position {trained['acceptance_per_position']}")
    assert untrained["tau"] < 1.1 and trained["tau"] > untrained["tau"] + 0.4
