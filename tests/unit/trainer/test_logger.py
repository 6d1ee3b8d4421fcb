import json

from omegaconf import OmegaConf

from trainer.logger import LoggerConfig, RunLogger, save_resolved_config


def test_metrics_jsonl_one_object_per_step(tmp_path):
    logger = RunLogger(LoggerConfig(progress=False), tmp_path, is_main=True)
    logger.log(1, {"loss": 2.5, "acc": [0.5, 0.25]})
    logger.log(2, {"loss": float("nan")})
    logger.close()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines == [{"step": 1, "loss": 2.5, "acc": [0.5, 0.25]}, {"step": 2, "loss": "nan"}]


def test_other_ranks_write_nothing(tmp_path):
    logger = RunLogger(LoggerConfig(), tmp_path / "x", is_main=False, total=10)
    logger.log(1, {"loss": 1.0})
    assert not (tmp_path / "x").exists()


def test_wandb_without_network_or_key_logs_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = RunLogger(LoggerConfig(wandb=True, progress=False), tmp_path, is_main=True,
                       config=OmegaConf.create({"a": 1}))
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert list((tmp_path / "wandb").glob("offline-run-*")), "wandb should have logged an offline run"


def test_resolved_config_saved(tmp_path):
    cfg = OmegaConf.create({"name": "x", "run_dir": "outputs/${name}"})
    path = save_resolved_config(cfg, tmp_path)
    assert "run_dir: outputs/x" in path.read_text()
