"""Every option of every config group composes against its schema; mistakes fail with Hydra's message."""
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from tests.helpers import REPO
from trainer.config import register_configs

GROUPS = ["target", "modality", "data", "draft", "objective", "trainer", "deepspeed", "cluster",
          "experiment"]


def _options(group):
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option, hydra_restore):
    cfg = _compose([f"{group}={option}"])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["run_dir"] and resolved["target"]["path"]
    OmegaConf.to_object(cfg)  # every value converts to its dataclass field type


def test_groups_have_options():
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ has no option"


def test_default_target_is_the_embedded_tiny_chat(hydra_restore):
    cfg = _compose([])
    assert Path(cfg.target.path) == REPO / "assets" / "tiny-chat-llama"
    assert cfg.run_dir == "outputs/default" and cfg.modality.name == "text"


def test_misspelt_key_fails_naming_it(hydra_restore):
    with pytest.raises(ConfigCompositionException) as err:
        _compose(["trainer.max_stepz=3"])
    assert "max_stepz" in str(err.value.__cause__ or err.value)


def test_wrong_type_fails_naming_key(hydra_restore):
    with pytest.raises(ConfigCompositionException) as err:
        _compose(["trainer.max_steps=many"])
    assert "trainer.max_steps" in str(err.value.__cause__ or err.value)


def test_unknown_option_lists_choices(hydra_restore):
    with pytest.raises(Exception, match="zero3_offload"):
        _compose(["deepspeed=zero9"])
