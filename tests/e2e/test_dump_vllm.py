"""`aerie dump engine=vllm`: the target's states from vLLM's hidden-state extraction
(tools/vllm/dump_worker.py) fill the same store as the HF forward, and a draft trained offline from either
store has the same losses."""
import json

import pytest
import torch

from data.batching import collate
from data.store.format import StoreConfig
from data.store.reader import HiddenStateStoreReader
from tests.helpers import TINY_CHAT, TINY_TRAIN_OVERRIDES, read_metrics, run_aerie
from tools.dump import dump_from_hidden_states, run_dump


@pytest.mark.slow  # loads the tiny target (about 20 s on a busy 2-core machine)
def test_a_store_from_extracted_states_equals_the_forward_dump(tmp_path):
    """What the vLLM path writes, given the states the HF forward computes (aux layers + last layer's
    output)."""
    from models.targets.base import TargetConfig
    from models.targets.hf import HFTargetModel
    from models.targets.teacher import load_lm_head_only

    target = HFTargetModel.load(TargetConfig(path=str(TINY_CHAT), dtype="float32"))
    rows = [{"id": f"r{i}", "input_ids": list(range(40 + i, 52 + 2 * i)), "loss_mask": [1] * (12 + i)}
            for i in range(3)]
    for layout in ("compact", "full"):
        forward = StoreConfig(path=str(tmp_path / f"hf-{layout}"), layout=layout)
        run_dump(target, rows, forward)
        states = []
        for i, row in enumerate(rows):
            batch = collate([row], packed=False, max_tokens=10 ** 9)
            out = target.forward(batch, torch.arange(target.spec.vocab_size), return_last_hidden=True)
            aux = out.aux_hidden_states[0].reshape(len(row["input_ids"]), -1, target.spec.hidden_size)
            states.append((i, row, torch.cat([aux, out.last_hidden_state[0][:, None]], dim=1)))
        extracted = StoreConfig(path=str(tmp_path / f"x-{layout}"), layout=layout)
        dump_from_hidden_states(target.spec, load_lm_head_only(target.cfg), iter(states), extracted)
        for a, b in zip(HiddenStateStoreReader(forward.path), HiddenStateStoreReader(extracted.path)):
            assert a.keys() == b.keys() and a["id"] == b["id"]
            for key in a:
                if key != "id":
                    assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), (layout, key)
    assert (json.load(open(tmp_path / "x-full" / "manifest.json"))["aux_layer_ids"]
            == target.spec.aux_layer_ids)


@pytest.mark.slow
def test_aerie_dump_engine_vllm_matches_the_hf_dump_and_trains_the_same(tmp_path, data_cache):
    from tools.vllm.engine import vllm_python

    try:
        vllm_python()
    except ValueError as e:
        pytest.skip(str(e))
    common = [f"data.cache_dir={data_cache}", *TINY_TRAIN_OVERRIDES, "data.max_samples=16",
              "trainer.max_steps=3", "store.layout=full"]
    hf, vllm = tmp_path / "hf", tmp_path / "vllm"
    run_aerie("dump", f"run_dir={hf}", *common)
    out = run_aerie("dump", f"run_dir={vllm}", *common, "engine=vllm")
    assert "states from vLLM" in out.stdout
    num = 0
    stores = [HiddenStateStoreReader(str(run_dir / "store" / "train")) for run_dir in (hf, vllm)]
    assert len(stores[0]) == len(stores[1]) > 8
    for a, b in zip(*stores):
        assert a["id"] == b["id"] and torch.equal(a["input_ids"], b["input_ids"])
        for key in ("aux_hidden_states", "last_hidden_state"):  # both stored in bf16: within its rounding
            assert torch.allclose(a[key], b[key], rtol=1 / 64, atol=1e-3), key
        num += 1
    assert num == len(stores[0]) and not list(vllm.glob("store/*.vllm-states"))
    for run_dir in (hf, vllm):
        run_aerie("train", f"run_dir={run_dir}", *common, "trainer.mode=offline")
    for x, y in zip(read_metrics(hf), read_metrics(vllm)):
        assert y["loss"] == pytest.approx(x["loss"], rel=5e-3), x["step"]  # stores equal up to bf16 rounding
