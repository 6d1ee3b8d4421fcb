"""Every option of every config group composes against its schema, every command's root composes, YAML only
overrides the dataclass defaults; mistakes fail with Hydra's message."""
import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from tests.helpers import REPO
from tools.cli import CONFIG_ROOTS
from tools.config import register_configs, validate_config

ROOT_GROUPS = {"train": {"data", "draft", "trainer", "deepspeed", "engine"}, "eval": {"draft", "engine"},
               "export": {"draft"}, "plan": {"draft", "trainer", "deepspeed", "cluster"},
               "data": {"data", "draft"}}
GROUPS = ["target", "modality", "data", "draft", "objective", "trainer", "deepspeed", "cluster",
          "experiment"]


def _options(group):
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


def _compose(overrides, root="train"):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name=root, overrides=overrides)


@pytest.mark.parametrize("group,option", [(g, o) for g in GROUPS for o in _options(g)])
def test_every_option_composes(group, option, hydra_restore):
    cfg = _compose([f"{group}={option}"], root="plan" if group == "cluster" else "train")
    resolved = OmegaConf.to_container(cfg, resolve=True)
    assert resolved["run_dir"] and resolved["target"]["path"]
    OmegaConf.to_object(cfg)  # every value converts to its dataclass field type


@pytest.mark.parametrize("command", sorted(CONFIG_ROOTS))
def test_each_command_root_composes_its_groups_and_validates(command, hydra_restore):
    root = CONFIG_ROOTS[command]
    cfg = _compose([], root=root)
    validate_config(cfg, command)
    chosen = {g for g in ("data", "draft", "trainer", "deepspeed", "cluster", "engine")
              if (REPO / "conf" / f"{root}.yaml").read_text().count(f"  - {g}: ")}
    assert chosen == ROOT_GROUPS[root] and cfg.target.path and cfg.modality.name == "text"
    assert OmegaConf.is_missing(cfg, "draft") == ("draft" not in chosen)


def test_yaml_options_only_override_the_dataclass_defaults():
    """One source of defaults: no option repeats a value its schema already has."""
    from tools.config import AerieConfig

    schemas = {f.name: f.default_factory() for f in dataclasses.fields(AerieConfig)
               if f.default_factory is not dataclasses.MISSING}
    for group in ("target", "data", "trainer", "deepspeed", "cluster", "engine"):
        for option in _options(group):
            values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / group / f"{option}.yaml")) or {}
            repeated = [k for k, v in values.items() if k != "defaults" and getattr(schemas[group], k) == v]
            assert not repeated, f"conf/{group}/{option}.yaml repeats the dataclass defaults of {repeated}"
    for option in _options("experiment"):  # @package _global_: sections of the root
        values = OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "experiment" / f"{option}.yaml"))
        repeated = [f"{section}.{k}" for section, body in values.items() if section in schemas
                    for k, v in body.items() if getattr(schemas[section], k) == v]
        assert not repeated, f"conf/experiment/{option}.yaml repeats the dataclass defaults of {repeated}"


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
