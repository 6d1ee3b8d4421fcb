"""The ttt objective built from the composed config: its loss, its metrics, noise augmentation, bad knobs."""
import pytest
import torch
from hydra import compose, initialize_config_dir

from models.objectives.base import TeacherInputs, build_objective, chain_tau
from models.objectives.ttt import TTTObjective, TTTObjectiveConfig
from models.registry import OBJECTIVES
from tests.helpers import REPO, make_batch, make_draft
from tools.config import register_configs


def _compose(overrides):
    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        return compose(config_name="train", overrides=overrides)


def _inputs(batch):
    keys = ("input_ids", "aux_hidden_states", "teacher_logits", "teacher_argmax", "loss_mask", "position_ids",
            "document_ids")
    return TeacherInputs(*(batch[key] for key in keys))


def test_composed_config_builds_the_registered_objective(hydra_restore):
    cfg = _compose(["objective.loss=lk", "objective.noise_std=0.05", "draft.ttt_steps=2"])
    objective = build_objective(cfg.objective, cfg.draft)
    assert isinstance(objective, OBJECTIVES.get("ttt")) and objective.cfg.loss == "lk"
    assert objective.cfg.noise_std == 0.05 and objective.draft_cfg.ttt_steps == 2


def test_objective_output_and_summary():
    draft, batch = make_draft(), make_batch([[20], [24]], 24)
    objective = TTTObjective(TTTObjectiveConfig(loss="lk"), _draft_cfg(3))
    out = objective(draft, _inputs(batch))
    assert out.loss.requires_grad and all(not v.requires_grad for v in out.sums.values())
    doubled = objective.summarise({k: 2 * v for k, v in out.sums.items()})
    single = objective.summarise(out.sums)
    counts = ("num_tokens", "num_out_of_vocab")
    assert {k: v for k, v in doubled.items() if k not in counts} == pytest.approx(
        {k: v for k, v in single.items() if k not in counts})  # means over micro-batches and positions
    assert doubled["num_tokens"] == 2 * single["num_tokens"]
    acc = [single[f"acc_{i}"] for i in range(3)]
    assert single["tau_sim"] == pytest.approx(chain_tau(acc))
    assert 1.0 <= single["tau_sim_sampled"] <= 4.0 and single["num_tokens"] == float(out.sums["count"][0])


def _draft_cfg(ttt_steps):
    from models.draft.eagle3 import DraftConfig

    return DraftConfig(ttt_steps=ttt_steps)


def test_noise_is_relative_seeded_and_training_only():
    draft, batch = make_draft(), make_batch([[16]], 16)
    aux = batch["aux_hidden_states"]
    objective = TTTObjective(TTTObjectiveConfig(noise="uniform", noise_std=0.1), _draft_cfg(2))
    noisy = objective.noisy(aux, 3, noise_seed=7)
    assert torch.equal(noisy, objective.noisy(aux, 3, noise_seed=7))
    assert not torch.equal(noisy, objective.noisy(aux, 3, noise_seed=8))
    assert objective.noisy(aux, 3, noise_seed=None) is aux  # evaluation: no noise
    layers, delta = aux.unflatten(-1, (3, -1)), (noisy - aux).unflatten(-1, (3, -1))
    rms = layers.pow(2).mean(-1, keepdim=True).sqrt()
    assert bool((delta.abs() <= 0.1 * rms + 1e-12).all())
    assert float(delta.abs().max()) > 0.05 * float(rms.min())
    plain = TTTObjective(TTTObjectiveConfig(), _draft_cfg(2))
    assert plain.noisy(aux, 3, noise_seed=7) is aux  # noise_std=0: off
    assert objective(draft, _inputs(batch), 7).loss != plain(draft, _inputs(batch), 7).loss


@pytest.mark.parametrize("knob,value,message", [
    ("loss", "hinge", "unknown objective loss 'hinge'; available: lk, lk_hybrid, soft_ce"),
    ("noise", "pink", "objective.noise must be uniform or gaussian"),
    ("noise_std", -1.0, "objective.noise_std must be >= 0"),
    ("top1_weight", -0.5, "objective.top1_weight must be >= 0"),
])
def test_bad_knobs_fail_naming_them(knob, value, message):
    with pytest.raises(ValueError, match=message):
        TTTObjective(TTTObjectiveConfig(**{knob: value}), _draft_cfg(2))
