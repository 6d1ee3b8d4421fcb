import math
from types import SimpleNamespace

import pytest

from trainer.engine import DeepSpeedConfig, build_ds_config, lr_multiplier


def _trainer(**kw):
    base = dict(precision="fp32", adam_betas=[0.9, 0.95], lr=1e-3, weight_decay=0.0, grad_clip=0.5,
                grad_accum_steps=2)
    base.update(kw)
    return SimpleNamespace(**base)


def test_cosine_schedule_formula():
    assert lr_multiplier(0, 4, 20, "cosine", 0.1) == pytest.approx(0.25)
    assert lr_multiplier(3, 4, 20, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_multiplier(4, 4, 20, "cosine", 0.1) == pytest.approx(1.0)
    mid = 4 + 8
    assert (lr_multiplier(mid, 4, 20, "cosine", 0.1)
            == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5))))
    assert lr_multiplier(20, 4, 20, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_multiplier(10, 4, 20, "constant", 0.1) == 1.0
    with pytest.raises(ValueError, match="cosine or constant"):
        lr_multiplier(0, 0, 10, "linear", 0.1)


def test_ds_config_per_stage():
    for stage in (1, 2, 3):
        cfg = build_ds_config(DeepSpeedConfig(zero_stage=stage), _trainer(), world_size=4)
        assert cfg["zero_optimization"]["stage"] == stage
        assert cfg["train_batch_size"] == 8 and cfg["gradient_accumulation_steps"] == 2
        assert cfg["gradient_clipping"] == 0.5 and cfg["bf16"]["enabled"] is False
    offload = build_ds_config(DeepSpeedConfig(zero_stage=3, offload_param=True, offload_optimizer=True),
                              _trainer(), 1)
    assert offload["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert build_ds_config(DeepSpeedConfig(), _trainer(precision="bf16"), 1)["bf16"]["enabled"] is True


def test_extra_is_merged_last():
    cfg = build_ds_config(DeepSpeedConfig(extra={"zero_optimization": {"reduce_bucket_size": 7}, "foo": 1}),
                          _trainer(), 1)
    assert cfg["zero_optimization"]["reduce_bucket_size"] == 7 and cfg["zero_optimization"]["stage"] == 2
    assert cfg["foo"] == 1


def test_bad_settings_rejected():
    with pytest.raises(ValueError, match="zero_stage"):
        build_ds_config(DeepSpeedConfig(zero_stage=4), _trainer(), 1)
    with pytest.raises(ValueError, match="offload_param needs"):
        build_ds_config(DeepSpeedConfig(zero_stage=2, offload_param=True), _trainer(), 1)
    with pytest.raises(ValueError, match="precision"):
        build_ds_config(DeepSpeedConfig(), _trainer(precision="fp8"), 1)
