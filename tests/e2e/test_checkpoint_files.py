"""What a checkpoint may contain: parse failures are skipped like other corruption, nothing in it can run
code, and Aerie's own RNG files load with torch's weights-only unpickler."""
import json
import os

import pytest
import torch

from trainer.checkpoint import CheckpointManager, checkpoint_problem, file_sha256

pytestmark = pytest.mark.slow  # needs the session's base run


def _reseal(step_dir):
    """Rewrite manifest.json to match the files as they are now (a checkpoint written corrupt, or forged)."""
    manifest = step_dir / "manifest.json"
    entries = {str(p.relative_to(step_dir)): {"size": p.stat().st_size, "sha256": file_sha256(p)}
               for p in sorted(step_dir.rglob("*")) if p.is_file() and p != manifest}
    manifest.write_text(json.dumps({"step": 0, "files": entries}))


def _manager(run_dir):
    return CheckpointManager(run_dir / "ckpt", rank=0, world_size=1)


def test_unparsable_trainer_state_is_skipped(run_copy):
    step = run_copy / "ckpt" / "step-4"
    (step / "trainer_state.json").write_text('{"step": 4, "micro_batc')
    _reseal(step)
    assert "trainer_state.json does not parse" in checkpoint_problem(step)
    with pytest.warns(UserWarning, match="skipping checkpoint .*step-4.*trainer_state.json"):
        assert _manager(run_copy).find_resumable() == run_copy / "ckpt" / "step-2"


def test_unparsable_optimizer_shard_is_skipped(run_copy):
    step = run_copy / "ckpt" / "step-4"
    shard = step / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    shard.write_bytes(b"PK\x03\x04" + os.urandom(2048))
    _reseal(step)
    assert "zero_pp_rank_0_mp_rank_00_optim_states.pt does not load" in checkpoint_problem(step)
    with pytest.warns(UserWarning, match="skipping checkpoint"):
        assert _manager(run_copy).find_resumable() == run_copy / "ckpt" / "step-2"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_cannot_run_code_on_resume_or_export(run_copy, tmp_path):
    from trainer.checkpoint import load_draft_from_checkpoint

    marker = tmp_path / "code-ran"
    step = run_copy / "ckpt" / "step-4"
    states = torch.load(step / "mp_rank_00_model_states.pt", weights_only=False)  # our own file: trusted
    states["payload"] = _RunsCode(marker)
    torch.save(states, step / "mp_rank_00_model_states.pt")
    _reseal(step)
    assert ("does not load as weights only" in checkpoint_problem(step)
            and "system" in checkpoint_problem(step))
    with pytest.raises(ValueError, match="refusing to load this checkpoint"):
        load_draft_from_checkpoint(step)  # what `aerie export export.draft=<step dir>` runs
    assert not marker.exists()


def test_rng_states_load_weights_only(base_run):
    state = torch.load(base_run / "ckpt" / "step-2" / "rng" / "rank-0.pt", weights_only=True)
    assert torch.is_tensor(state["torch"]) and torch.is_tensor(state["numpy"][1])


def test_manifest_records_a_checksum_per_file(base_run):
    step = base_run / "ckpt" / "step-4"
    entries = json.loads((step / "manifest.json").read_text())["files"]
    assert {"mp_rank_00_model_states.pt", "trainer_state.json", "rng/rank-0.pt"} <= set(entries)
    assert all(entry["sha256"] == file_sha256(step / name) for name, entry in entries.items())
