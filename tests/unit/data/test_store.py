"""Hidden-state store: exact full round trip, bounded fp8 error, resume, corruption, rank sharding, run_dump,
the compact teacher (top-k + systematic tail samples) and version-1 stores."""
import json
import os
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from data.store.batch import collate_store, teacher_from_store_batch
from data.store.format import StoreConfig, bytes_per_token, dequantize_fp8, sample_tail
from data.store.reader import HiddenStateStoreReader
from data.store.writer import HiddenStateStoreWriter
from tools.dump import run_dump

H, A, V, K, S = 16, 3, 512, 4, 5


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
                    "teacher_tail_ids": torch.randint(0, V, (length, S), generator=g),
                    "teacher_argmax": torch.randint(0, V, (length,), generator=g)})
    return out


def write(path, layout, items, shard_bytes=600, tail_samples=S):
    w = HiddenStateStoreWriter(str(path), layout, H, A, [1, 2, 3], V, "target-x", topk=K,
                               shard_bytes=shard_bytes, tail_samples=tail_samples)
    for i, s in enumerate(items):
        kept = dict(s) if layout == "compact" else {k: v for k, v in s.items() if not k.startswith("teacher")}
        if layout == "compact":
            kept.pop("last_hidden_state")
            if not tail_samples:
                kept.pop("teacher_tail_ids")
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
        assert torch.equal(g["teacher_tail_ids"], s["teacher_tail_ids"])
        assert torch.equal(g["teacher_argmax"], s["teacher_argmax"])
    raw = next(iter(HiddenStateStoreReader(str(tmp_path), dequantize=False)))
    assert raw["aux_hidden_states"].dtype == torch.float8_e4m3fn and raw["aux_scales"].shape == (3, A)
    assert torch.equal(dequantize_fp8(raw["aux_hidden_states"], raw["aux_scales"]),
                       next(iter(HiddenStateStoreReader(str(tmp_path))))["aux_hidden_states"])
    assert bytes_per_token("compact", 4096, 3, 128256) <= 3.5 * 4096
    assert bytes_per_token("compact", 256, 3, 8192) <= 3.5 * 256
    assert bytes_per_token("full", 256, include_tokens=False) == 8 * 256


@pytest.mark.parametrize("layout,tail_samples", [("full", 0), ("compact", S), ("compact", 0)])
def test_bytes_per_token_matches_shards(tmp_path, layout, tail_samples):
    from safetensors import safe_open

    w = write(tmp_path, layout, samples(6), tail_samples=tail_samples)
    stored = tokens = 0
    for entry in w.manifest["shards"]:
        with safe_open(str(tmp_path / entry["file"]), framework="pt") as f:
            stored += sum(f.get_tensor(k).nbytes for k in f.keys() if k != "offsets")
        tokens += entry["num_tokens"]
    assert stored == tokens * bytes_per_token(layout, H, A, V, K, tail_samples=tail_samples)


def test_resume_skips_complete_shards(tmp_path):
    items = samples(10)
    write(tmp_path, "compact", items[:7], shard_bytes=10 ** 9)  # one shard of 7 samples
    mtime = os.path.getmtime(tmp_path / "shard-00000.safetensors")
    (tmp_path / "shard-00001.safetensors.tmp123").write_bytes(b"partial")  # an interrupted write
    w = HiddenStateStoreWriter(str(tmp_path), "compact", H, A, [1, 2, 3], V, "target-x",
                               topk=K, tail_samples=S)
    assert w.num_samples == 7 and not (tmp_path / "shard-00001.safetensors.tmp123").exists()
    for i, s in enumerate(items[7:], 7):
        w.add(sample_id=f"s{i}", **{k: v for k, v in s.items() if k != "last_hidden_state"})
    w.close()
    assert os.path.getmtime(tmp_path / "shard-00000.safetensors") == mtime
    assert [g["id"] for g in HiddenStateStoreReader(str(tmp_path))] == [f"s{i}" for i in range(10)]
    with pytest.raises(ValueError, match="differs in"):
        HiddenStateStoreWriter(str(tmp_path), "compact", H, A, [1, 2, 3], V, "target-y",
                               topk=K, tail_samples=S)


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
    """Deterministic stand-in with the TargetModel forward contract (embedding -> 3 aux projections ->
    head)."""

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
        return SimpleNamespace(aux_hidden_states=self.module["aux"](h),
                               teacher_logits=logits[..., draft_token_ids], teacher_argmax=logits.argmax(-1),
                               last_hidden_state=h if return_last_hidden else None)


def test_run_dump_compact_and_full(tmp_path):
    target = ToyTarget()
    rows = [{"id": f"r{i}", "input_ids": list(range(i, i + 4 + i)), "loss_mask": [1] * (4 + i)}
            for i in range(5)]
    cfg = StoreConfig(path=str(tmp_path / "c"), layout="compact", topk=K, shard_bytes=2000,
                      batch_max_tokens=24)
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
    tail = got["r3"]["teacher_tail_ids"]
    assert (tail.shape == (len(rows[3]["input_ids"]), cfg.tail_samples)
            and not (tail[..., None] == ids[:, None]).any())
    assert torch.equal(tail, sample_tail(logprobs, ids, cfg.tail_samples, torch.Generator().manual_seed(3)))
    single = StoreConfig(path=str(tmp_path / "c1"), layout="compact", topk=K)
    run_dump(target, rows, single)  # one rank, other batches: the same tail samples
    assert all(torch.equal(g["teacher_tail_ids"], got[g["id"]]["teacher_tail_ids"])
               for g in HiddenStateStoreReader(single.path))
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


def test_sample_tail_systematic_and_unbiased():
    g = torch.Generator().manual_seed(0)
    logprobs = torch.log_softmax(torch.randn(1, 40, generator=g) * 2, -1).expand(4000, 40)
    topk = logprobs.topk(K, -1).indices
    draws = sample_tail(logprobs, topk, S, g)
    counts = torch.zeros(4000, 40).scatter_add_(-1, draws, torch.ones_like(draws, dtype=torch.float))
    probs = logprobs[0].exp().scatter(-1, topk[0], 0.0)
    expected = S * probs / probs.sum()  # draws per row of each column, in expectation
    assert (counts[:, topk[0]] == 0).all()
    assert ((counts >= expected.floor()) & (counts <= expected.ceil())).all()  # systematic: floor or ceil
    assert torch.allclose(counts.mean(0), expected, atol=0.05)  # unbiased


def _teacher_batch(p, draft_ids, rows, seed=0):
    logprobs = p.log().expand(rows, -1)
    values, topk = logprobs.topk(K, -1)
    tail = sample_tail(logprobs, topk, S, torch.Generator().manual_seed(seed))
    batch = {"teacher_topk_logprobs": values.half().float(), "teacher_topk_ids": topk,
             "teacher_tail_ids": tail, "teacher_argmax": topk[:, 0]}
    return batch, teacher_from_store_batch(batch, None, draft_ids)[0].softmax(-1)


def test_compact_teacher_estimates_distribution():
    """Top-k entries exact, the tail an unbiased estimate, summing to 1; restricted to a draft vocab it
    renormalises."""
    # high entropy: heavy tail
    p = torch.softmax(torch.randn(64, generator=torch.Generator().manual_seed(1)), -1)
    full = torch.arange(64)
    batch, q = _teacher_batch(p, full, 3000)
    topk = batch["teacher_topk_ids"][0]
    assert p[topk].sum() < 0.5
    assert torch.allclose(q.sum(-1), torch.ones(3000), atol=1e-5)
    assert torch.allclose(q[:, topk], p[topk].expand(3000, -1), rtol=2e-3)  # fp16 log-probs
    assert torch.allclose(q.mean(0), p, atol=3e-3)
    assert (q.mean(0) - p).abs().sum() < 0.05
    # a draft vocab without the second most likely id: its mass must not leak (e.g. into draft index 0)
    draft = torch.tensor([i for i in range(64) if i != topk[1]])
    _, qd = _teacher_batch(p, draft, 3000)
    assert torch.allclose(qd.mean(0), p[draft] / p[draft].sum(), atol=3e-3)
    # version 1 batches (no tail samples): the softmax renormalises over the top-k alone
    batch.pop("teacher_tail_ids")
    q1 = teacher_from_store_batch(batch, None, full)[0].softmax(-1)[0]
    assert torch.allclose(q1[topk], p[topk] / p[topk].sum(), rtol=2e-3) and q1.sum() == pytest.approx(1.0)
    assert q1[[i for i in range(64) if i not in topk.tolist()]].max() < 1e-6


def test_collate_store_lays_out_tail_ids(tmp_path):
    items = samples(3)
    write(tmp_path, "compact", items)
    got = [HiddenStateStoreReader(str(tmp_path)).sample(i) for i in range(3)]
    batch = collate_store(got, packed=True, max_tokens=64)
    lengths = [len(s["input_ids"]) for s in items]
    assert batch["teacher_tail_ids"].shape == (1, sum(lengths), S)
    assert torch.equal(batch["teacher_tail_ids"][0, lengths[0]: lengths[0] + lengths[1]],
                       items[1]["teacher_tail_ids"])


def test_version_1_store_still_read(tmp_path):
    items = samples(4)
    write(tmp_path, "compact", items, tail_samples=0)
    manifest_path = tmp_path / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["version"] = 1
    del manifest["tail_samples"]  # as version 1 wrote it
    manifest_path.write_text(json.dumps(manifest))
    got = list(HiddenStateStoreReader(str(tmp_path)))
    assert len(got) == 4 and "teacher_tail_ids" not in got[0]
    assert torch.equal(got[2]["teacher_topk_ids"], items[2]["teacher_topk_ids"])
    w = HiddenStateStoreWriter(str(tmp_path), "compact", H, A, [1, 2, 3], V, "target-x",
                               topk=K, tail_samples=0)
    assert w.num_samples == 4  # resumable by this writer
    manifest["version"] = 3
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="version 3 is not readable"):
        HiddenStateStoreReader(str(tmp_path))
