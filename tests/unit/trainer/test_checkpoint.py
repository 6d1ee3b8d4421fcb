"""The checkpoint manager (trainer/checkpoint.py): manifests, the checks that make a step dir resumable,
skipping broken ones for the newest intact one, RNG state, and a real DeepSpeed engine saved, published and
loaded."""
import errno
import json
import random
import warnings

import numpy as np
import pytest
import torch

from trainer.checkpoint import (
    MANIFEST,
    CheckpointManager,
    checkpoint_problem,
    file_sha256,
    load_weights_only,
    rng_state,
    set_rng_state,
    write_manifest,
)


class RunsCode:
    def __reduce__(self):
        return (print, ("unpickled",))


def make_step(root, step, **files):
    """A complete step dir: trainer state, a weights-only .pt, `files`, and the manifest written last."""
    path = root / f"step-{step}"
    (path / "rng").mkdir(parents=True)
    (path / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": 1}))
    torch.save({"w": torch.arange(4.0) * step}, path / "rng" / "rank-0.pt")
    for name, text in files.items():
        (path / name).write_text(text)
    write_manifest(path, step)
    return path


def test_manifest_records_size_and_sha256_of_every_file(tmp_path):
    path = make_step(tmp_path, 3, **{"config.yaml": "seed: 0\n"})
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["step"] == 3
    assert set(manifest["files"]) == {"trainer_state.json", "rng/rank-0.pt", "config.yaml"}
    entry = manifest["files"]["config.yaml"]
    assert entry == {"size": 8, "sha256": file_sha256(path / "config.yaml")}
    assert checkpoint_problem(path) is None


@pytest.mark.parametrize("damage,reason", [
    (lambda p: (p / MANIFEST).unlink(), "no manifest.json (incomplete write)"),
    (lambda p: (p / MANIFEST).write_text("{"), "unreadable manifest.json"),
    (lambda p: (p / "config.yaml").unlink(), "missing config.yaml"),
    (lambda p: (p / "config.yaml").write_text("seed: 0\n\n"), "config.yaml has 9 bytes, manifest says 8"),
    (lambda p: (p / "config.yaml").write_text("seed: 1\n"), "config.yaml does not match its sha256"),
])
def test_a_damaged_step_dir_is_named(tmp_path, damage, reason):
    path = make_step(tmp_path, 2, **{"config.yaml": "seed: 0\n"})
    damage(path)
    assert checkpoint_problem(path).startswith(reason)


def test_unparsable_state_and_code_in_a_pickle_are_refused(tmp_path):
    state = tmp_path / "a" / "step-1"
    state.mkdir(parents=True)
    (state / "trainer_state.json").write_text("{not json")
    write_manifest(state, 1)  # intact files, but the state cannot be read
    assert checkpoint_problem(state).startswith("trainer_state.json does not parse")
    code = make_step(tmp_path / "b", 1)
    torch.save({"payload": RunsCode()}, code / "rng" / "rank-0.pt")
    (code / MANIFEST).unlink()
    write_manifest(code, 1)  # checksums match: only the unpickler can tell
    expected = "rng/rank-0.pt does not load as weights only (it calls print, not plain data)"
    assert checkpoint_problem(code) == expected


def test_find_resumable_takes_the_newest_intact_step_and_warns_about_newer_broken_ones(tmp_path):
    manager = CheckpointManager(tmp_path, rank=0, world_size=1)
    assert manager.complete_steps() == [] and manager.find_resumable() is None
    for step in (2, 4, 10):
        make_step(tmp_path, step)
    (tmp_path / ".tmp-step-12").mkdir()  # a crash mid-write: hidden, never a candidate
    (tmp_path / "step-x").mkdir()
    (tmp_path / "step-10" / "trainer_state.json").write_text("{}")  # corrupted after its manifest
    assert manager.complete_steps() == [2, 4, 10]
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-10: trainer_state.json has 2 bytes"):
        assert manager.find_resumable() == tmp_path / "step-4"


def test_rng_state_round_trips_through_a_weights_only_load(tmp_path):
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    torch.save(rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(load_weights_only(tmp_path / "rng.pt"))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---- a real DeepSpeed engine (ZeRO-2, fp32, one gloo rank) ----
def _engine(seed):
    from types import SimpleNamespace

    from trainer.engine import DeepSpeedConfig, build_ds_config, build_engine

    torch.manual_seed(seed)
    trainer = SimpleNamespace(precision="fp32", adam_betas=[0.9, 0.95], lr=1e-2, weight_decay=0.0,
                              grad_clip=0.0, grad_accum_steps=1)
    module = torch.nn.Linear(6, 4)
    ds_config = build_ds_config(DeepSpeedConfig(zero_stage=2), trainer, world_size=1)
    engine, _, _ = build_engine(module, module.parameters(), ds_config, lambda step: 1.0)
    return engine


def _train_step(engine):
    loss = engine(torch.ones(2, 6)).pow(2).sum()
    engine.backward(loss)
    engine.step()


@pytest.mark.slow  # DeepSpeed's start-up and two engines
def test_save_publishes_prunes_and_loads_into_a_fresh_engine(tmp_path, process_group):
    root = tmp_path / "ckpt"
    manager = CheckpointManager(root, rank=0, world_size=1, keep_last=2)
    engine = _engine(seed=0)
    for step in (1, 2, 3):
        _train_step(engine)
        state = {"sampler": {"epoch": 0, "done_in_epoch": step}}
        path = manager.save(step, engine, state, {"config.yaml": b"x: 1\n"})
    assert path == root / "step-3" and (root / "latest").read_text() == "step-3\n"
    assert manager.complete_steps() == [2, 3]  # keep_last=2
    assert not list(root.glob(".tmp-*"))  # nothing half-written
    assert checkpoint_problem(path) is None and (path / "config.yaml").read_bytes() == b"x: 1\n"
    assert (path / "rng" / "rank-0.pt").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to skip
        assert manager.find_resumable() == path

    fresh = _engine(seed=1)
    assert not torch.equal(fresh.module.weight, engine.module.weight)
    state = manager.load(path, fresh)
    assert state["step"] == 3 and state["world_size"] == 1 and state["resharded"] is False
    assert state["sampler"] == {"epoch": 0, "done_in_epoch": 3}
    assert torch.equal(fresh.module.weight, engine.module.weight)
    assert torch.equal(fresh.module.bias, engine.module.bias)
    _train_step(engine), _train_step(fresh)  # the optimizer state came back too: the next step agrees
    assert torch.allclose(fresh.module.weight, engine.module.weight)


def test_a_full_disk_is_recognised_from_the_exception_chain(tmp_path):
    from trainer.checkpoint import _write_errno

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise RuntimeError("unexpected pos") from cause
    except RuntimeError as err:
        assert _write_errno(err, tmp_path) == errno.ENOSPC
    assert _write_errno(RuntimeError("a bug, not a write failure"), tmp_path) is None
    assert list(tmp_path.iterdir()) == []  # the probe file is gone
