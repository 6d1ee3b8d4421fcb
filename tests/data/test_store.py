"""Hidden-state store: exact full round trip, bounded fp8 error, resume, corruption, rank sharding, run_dump."""
import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from data.store import (HiddenStateStoreReader, HiddenStateStoreWriter, StoreConfig, bytes_per_token,
                        dequantize_fp8, run_dump)

H, A, V, K = 16, 3, 512, 4


def samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 3 + i % 5
        out.append({"input_ids": torch.randint(0, V, (length,), generator=g),
                    "loss_mask": torch.randint(0, 2, (length,), generator=g),
                    "aux_hidden_states": torch.randn(length, A * H, generator=g) * 10 ** (i % 3 - 1),
                    "last_hidden_state": torch.randn(length, H, generator=g).bfloat16(),
                    "teacher_topk_logprobs": -torch.rand(length, K, generator=g) * 5,
                    "teacher_topk_ids": torch.randint(0, V, (length, K), generator=g),
                    "teacher_argmax": torch.randint(0, V, (length,), generator=g)})
    return out


def write(path, layout, items, shard_bytes=600):
    w = HiddenStateStoreWriter(str(path), layout, H, A, [1, 2, 3], V, "target-x", topk=K, shard_bytes=shard_bytes)
    for i, s in enumerate(items):
        kept = dict(s) if layout == "compact" else {k: v for k, v in s.items() if not k.startswith("teacher")}
        if layout == "compact":
            kept.pop("last_hidden_state")
        w.add(sample_id=f"s{i}", **kept)
    w.close()
    return w


def test_full_round_trip_exact(tmp_path):
    items = samples(9)
    w = write(tmp_path, "full", items)
    assert len(w.manifest["shards"]) > 1
    got = list(HiddenStateStoreReader(str(tmp_path), dtype=torch.bfloat16, verify="sha256"))
    assert [g["id"] for g in got] == [f"s{i}" for i in range(9)]
    for g, s in zip(got, items):
        assert torch.equal(g["input_ids"], s["input_ids"]) and torch.equal(g["loss_mask"], s["loss_mask"])
        assert torch.equal(g["aux_hidden_states"], s["aux_hidden_states"].bfloat16())
        assert torch.equal(g["last_hidden_state"], s["last_hidden_state"])


def test_compact_bounded_error(tmp_path):
    items = samples(6)
    write(tmp_path, "compact", items)
    for g, s in zip(HiddenStateStoreReader(str(tmp_path)), items):
        x = s["aux_hidden_states"]
        scale = x.reshape(len(x), A, H).abs().amax(-1, keepdim=True) / 448
        bound = 2 ** -4 * x.reshape(len(x), A, H).abs() + scale * 2 ** -9  # e4m3 rounding + subnormal step
        assert ((g["aux_hidden_states"] - x).reshape(len(x), A, H).abs() <= bound).all()
        assert torch.allclose(g["teacher_topk_logprobs"], s["teacher_topk_logprobs"], rtol=1e-3, atol=1e-3)
        assert torch.equal(g["teacher_topk_ids"], s["teacher_topk_ids"])
        assert torch.equal(g["teacher_argmax"], s["teacher_argmax"])
    raw = next(iter(HiddenStateStoreReader(str(tmp_path), dequantize=False)))
    assert raw["aux_hidden_states"].dtype == torch.float8_e4m3fn and raw["aux_scales"].shape == (3, A)
    assert torch.equal(dequantize_fp8(raw["aux_hidden_states"], raw["aux_scales"]),
                       next(iter(HiddenStateStoreReader(str(tmp_path))))["aux_hidden_states"])
    assert bytes_per_token("compact", 4096, 3, 128256) <= 3.5 * 4096
    assert bytes_per_token("compact", 256, 3, 8192) <= 3.5 * 256
    assert bytes_per_token("full", 256, include_tokens=False) == 8 * 256


def test_resume_skips_complete_shards(tmp_path):
    items = samples(10)
    write(tmp_path, "compact", items[:7], shard_bytes=10 ** 9)  # one shard of 7 samples
    mtime = os.path.getmtime(tmp_path / "shard-00000.safetensors")
    (tmp_path / "shard-00001.safetensors.tmp123").write_bytes(b"partial")  # an interrupted write
    w = HiddenStateStoreWriter(str(tmp_path), "compact", H, A, [1, 2, 3], V, "target-x", topk=K)
    assert w.num_samples == 7 and not (tmp_path / "shard-00001.safetensors.tmp123").exists()
    for i, s in enumerate(items[7:], 7):
        w.add(sample_id=f"s{i}", **{k: v for k, v in s.items() if k != "last_hidden_state"})
    w.close()
    assert os.path.getmtime(tmp_path / "shard-00000.safetensors") == mtime
    assert [g["id"] for g in HiddenStateStoreReader(str(tmp_path))] == [f"s{i}" for i in range(10)]
    with pytest.raises(ValueError, match="differs in"):
        HiddenStateStoreWriter(str(tmp_path), "compact", H, A, [1, 2, 3], V, "target-y", topk=K)


def test_truncated_and_corrupt_shards_detected(tmp_path):
    write(tmp_path, "full", samples(6))
    shard = tmp_path / "shard-00001.safetensors"
    data = shard.read_bytes()
    shard.write_bytes(data[:-10])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        list(HiddenStateStoreReader(str(tmp_path)))
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        list(HiddenStateStoreReader(str(tmp_path), verify="sha256"))
    shard.write_bytes(b"\xff" * 8 + data[8:])  # garbage header length
    with pytest.raises(ValueError, match="corrupt shard"):
        list(HiddenStateStoreReader(str(tmp_path)))


def test_reader_rank_sharding(tmp_path):
    write(tmp_path, "full", samples(7))
    ids = [[g["id"] for g in HiddenStateStoreReader(str(tmp_path), rank=r, world_size=2)] for r in range(2)]
    assert ids == [["s0", "s2", "s4", "s6"], ["s1", "s3", "s5"]]
    assert HiddenStateStoreReader(str(tmp_path), rank=1, world_size=2).lengths() == [4, 6, 3]


@dataclass
class Spec:
    hidden_size: int = H
    vocab_size: int = V
    aux_layer_ids: tuple = (1, 2, 3)
    name_or_path: str = "toy"


class ToyTarget:
    """Deterministic stand-in with the TargetModel forward contract (embedding -> 3 aux projections -> head)."""

    def __init__(self):
        torch.manual_seed(0)
        self.spec = Spec()
        self.module = torch.nn.ModuleDict({"emb": torch.nn.Embedding(V, H), "aux": torch.nn.Linear(H, A * H),
                                           "head": torch.nn.Linear(H, V)})
        self.calls = 0

    def forward(self, batch, draft_token_ids, return_last_hidden=False):
        self.calls += 1
        h = self.module["emb"](batch["input_ids"])
        logits = self.module["head"](h)
        return SimpleNamespace(aux_hidden_states=self.module["aux"](h), teacher_logits=logits[..., draft_token_ids],
                               teacher_argmax=logits.argmax(-1), last_hidden_state=h if return_last_hidden else None)


def test_run_dump_compact_and_full(tmp_path):
    target = ToyTarget()
    rows = [{"id": f"r{i}", "input_ids": list(range(i, i + 4 + i)), "loss_mask": [1] * (4 + i)} for i in range(5)]
    cfg = StoreConfig(path=str(tmp_path / "c"), layout="compact", topk=K, shard_bytes=2000, batch_max_tokens=24)
    run_dump(target, rows, cfg, rank=0, world_size=2)
    run_dump(target, rows, cfg, rank=1, world_size=2)
    got = {g["id"]: g for g in HiddenStateStoreReader(cfg.path)}
    assert sorted(got) == [f"r{i}" for i in range(5)]
    with torch.no_grad():
        h = target.module["emb"](torch.tensor(rows[3]["input_ids"]))
        logprobs = torch.log_softmax(target.module["head"](h), -1)
        aux = target.module["aux"](h)
    values, ids = logprobs.topk(K, -1)
    assert torch.equal(got["r3"]["teacher_topk_ids"], ids)
    assert torch.allclose(got["r3"]["teacher_topk_logprobs"], values, atol=2e-3)
    assert torch.allclose(got["r3"]["aux_hidden_states"], aux, rtol=0.07, atol=1e-3)
    calls = target.calls
    run_dump(target, rows, cfg, rank=0, world_size=2)  # complete: nothing left to do
    assert target.calls == calls
    full = StoreConfig(path=str(tmp_path / "f"), layout="full")
    run_dump(target, rows, full)
    first = next(iter(HiddenStateStoreReader(full.path)))
    with torch.no_grad():
        h0 = target.module["emb"](torch.tensor(rows[0]["input_ids"]))
    assert torch.equal(first["last_hidden_state"], h0.bfloat16().float())
    manifest = json.load(open(tmp_path / "f" / "manifest.json"))
    assert manifest["layout"] == "full" and manifest["aux_layer_ids"] == [1, 2, 3]
