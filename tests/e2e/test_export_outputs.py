"""Outputs another user (a serving engine) can read, and exports without the trainer's machine paths."""
import json
import os
import stat

import pytest
from hydra import compose, initialize_config_dir

from tests.helpers import REPO
from tools.config import register_configs
from tools.export.base import run_export

pytestmark = pytest.mark.slow  # needs the session's base run


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def _umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _export(base_run, out_dir, *overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="export", overrides=[f"export.draft={base_run / 'final'}",
                                                       f"export.out_dir={out_dir}", *overrides])
    return run_export(cfg)


def test_final_export_and_vocab_follow_the_umask(base_run, tmp_path, hydra_restore):
    umask = _umask()
    assert _mode(base_run / "final") == 0o777 & ~umask
    assert _mode(base_run / "vocab.safetensors") == 0o666 & ~umask
    assert _mode(base_run / "final" / "model.safetensors") == 0o666 & ~umask
    out = _export(base_run, tmp_path / "export" / "vllm")
    assert _mode(out) == 0o777 & ~umask and _mode(out / "config.json") == 0o666 & ~umask


def test_export_names_the_verifier_without_machine_paths(base_run, tmp_path, hydra_restore):
    out = _export(base_run, tmp_path / "spec", "export.format=speculators")
    text = (out / "config.json").read_text()
    assert str(REPO) not in text and "/" not in json.loads(text)["aerie"]["target"]
    verifier = json.loads(text)["speculators_config"]["verifier"]
    assert verifier["name_or_path"] == "tiny-chat-llama" and verifier["architectures"] == ["LlamaForCausalLM"]
    out = _export(base_run, tmp_path / "spec2", "export.format=speculators", "export.verifier=acme/chat-8b")
    assert (json.loads((out / "config.json").read_text())["speculators_config"]["verifier"]["name_or_path"]
            == "acme/chat-8b")
