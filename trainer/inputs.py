"""What the Trainer eats: the target (or its teacher head), tokenised splits, the draft vocab and batches.

Batches are token-budget micro-batches (packed rows or length-grouped padding); every rank
walks its own shard of a seeded per-epoch order, and the position in it is two integers
(epoch, batches done) so a resume replays exactly the batches an uninterrupted run would see.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from omegaconf import OmegaConf


class EpochBatches:
    """An endless iterator of collated micro-batches over one rank's shard of the data."""

    def __init__(self, make_sampler: Callable[[int], Any], fetch: Callable[[List[int]], dict],
                 identity: str = ""):
        self.make_sampler = make_sampler  # epoch -> iterable of index lists for this rank
        self.fetch = fetch                # index list -> collated batch
        self.identity = identity          # the sampler's: lengths, budget, packing, seed, world size
        self.epoch = 0
        self.done_in_epoch = 0
        self._iter: Optional[Iterator] = None

    def _start(self) -> None:
        batches = list(self.make_sampler(self.epoch))
        if not batches:
            raise ValueError("the training split yields no batch: raise trainer.max_tokens_per_batch or add "
                             "data")
        self._iter = iter(batches[self.done_in_epoch:])

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self._iter is None:
            self._start()
        indices = next(self._iter, None)
        if indices is None:
            self.epoch += 1
            self.done_in_epoch = 0
            self._start()
            indices = next(self._iter)
        self.done_in_epoch += 1
        return self.fetch(indices)

    def state_dict(self) -> Dict[str, Any]:
        return {"epoch": self.epoch, "done_in_epoch": self.done_in_epoch, "identity": self.identity}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        if state.get("identity", self.identity) != self.identity:  # older checkpoints lack it
            raise ValueError("the checkpoint's data position was saved for other batches (data lengths, "
                             "trainer.max_tokens_per_batch, trainer.packed or seed differ): resume with the "
                             "run's settings, or start fresh with trainer.resume=never")
        self.epoch, self.done_in_epoch = int(state["epoch"]), int(state["done_in_epoch"])
        self._iter = None

    def resume_from_global(self, micro_batches_per_rank: int, old_world_size: int) -> None:
        """After a world-size change: skip as many samples' worth of batches as the old ranks consumed."""
        import torch.distributed as dist

        new_world = dist.get_world_size() if dist.is_initialized() else 1
        remaining = micro_batches_per_rank * old_world_size // new_world
        self.epoch, self.done_in_epoch, self._iter = 0, 0, None
        while True:
            epoch_len = len(list(self.make_sampler(self.epoch)))
            if remaining < epoch_len:
                self.done_in_epoch = remaining
                return
            remaining -= epoch_len
            self.epoch += 1


@dataclass
class TrainData:
    spec: Any                                   # TargetSpec
    vocab: Dict[str, torch.Tensor]              # d2t, t2d
    embed_tokens_weight: torch.Tensor
    train_batches: EpochBatches
    eval_batches: Callable[[], Iterator[dict]]
    head_weights: Callable[[], Tuple[torch.Tensor, torch.Tensor]]  # the target's final norm + lm_head weights
    target: Any = None                          # online: the TargetModel
    teacher_head: Any = None                    # offline: final norm + lm_head


def _sampler(lengths: List[int], cfg, dist, shuffle: bool):
    from data.batching import TokenBudgetBatchSampler

    return TokenBudgetBatchSampler(lengths, max_tokens_per_batch=cfg.trainer.max_tokens_per_batch,
                                   packed=cfg.trainer.packed, shuffle=shuffle, seed=cfg.seed,
                                   rank=dist.rank, world_size=dist.world_size)


def _dataset_fetcher(dataset, cfg, adapter) -> Callable[[List[int]], dict]:
    """Indices -> collated batch; multimodal rows are re-encoded from their record to load the media."""
    def fetch(indices: List[int]) -> dict:
        rows = dataset.select(indices)
        if adapter.is_multimodal:
            samples = [adapter.encode(json.loads(r["record"])) for r in rows]
        else:
            samples = [{"input_ids": r["input_ids"], "loss_mask": r["loss_mask"]} for r in rows]
        return adapter.collate(samples, packed=cfg.trainer.packed,
                               max_tokens=cfg.trainer.max_tokens_per_batch)

    return fetch


def _train_batches(lengths: List[int], fetch, cfg, dist) -> EpochBatches:
    """Endless shuffled micro-batches over this rank's shard."""
    sampler = _sampler(lengths, cfg, dist, shuffle=True)

    def make_sampler(epoch: int):
        sampler.set_epoch(epoch)
        return iter(sampler)

    return EpochBatches(make_sampler, fetch, identity=sampler.identity())


def _eval_batches(lengths: List[int], fetch, cfg, dist) -> Callable[[], Iterator[dict]]:
    """One fixed-order pass over this rank's shard of the eval split."""
    def run() -> Iterator[dict]:
        if not lengths:
            return
        sampler = _sampler(lengths, cfg, dist, shuffle=False)
        sampler.set_epoch(0)
        for indices in sampler:
            yield fetch(indices)

    return run


def build_adapter(cfg, tokenizer=None, processor=None, encode: bool = True, offline: bool = False):
    """The run's modality adapter (cfg.modality), after checking it is the one the target is loaded for.

    encode: it will encode records, so the target's tokenizer (and processor, multimodal) must exist.
    offline: refuse multimodal adapters (the store keeps no merged media embeddings)."""
    from models.registry import MODALITIES

    name = cfg.modality.name
    adapter_cls = MODALITIES.get(name)
    if cfg.target.modality != name:
        raise ValueError(f"target {cfg.target.path!r} is a {cfg.target.modality!r} target (target.modality) "
                         f"but modality={name}: add modality={cfg.target.modality} to the command line")
    if offline and adapter_cls.is_multimodal:
        raise ValueError(f"modality={name} trains online only (trainer.mode=online): the hidden-state store "
                         "keeps no merged media embeddings or M-RoPE positions")
    if encode and tokenizer is None:
        raise ValueError(f"target {cfg.target.path!r} has no tokenizer files "
                         "(tokenizer.json / tokenizer_config.json)")
    if encode and adapter_cls.is_multimodal and processor is None:
        raise ValueError(f"target {cfg.target.path!r} has no processor files (preprocessor_config.json), "
                         f"which the {name} adapter needs")
    return adapter_cls(OmegaConf.to_object(cfg.modality), tokenizer, processor,
                       data=OmegaConf.to_object(cfg.data))


def build_train_data(cfg, dist, ds_config: dict) -> TrainData:
    from data.dataset import build_tokenized_datasets, dataset_fingerprint
    from models.registry import TARGETS

    if cfg.trainer.mode == "offline":
        return build_offline_data(cfg, dist)
    target = TARGETS.get(cfg.target.backend).load(cfg.target, ds_config)
    adapter = build_adapter(cfg, target.tokenizer, target.processor)
    data_cfg = OmegaConf.to_object(cfg.data)
    train, evals = _main_first(dist, lambda: build_tokenized_datasets(data_cfg, target.tokenizer, adapter))
    if adapter.is_multimodal and len(train) and max(train["length"]) > cfg.trainer.max_tokens_per_batch:
        raise ValueError(f"a {cfg.modality.name} sample has {max(train['length'])} tokens > "
                         f"trainer.max_tokens_per_batch={cfg.trainer.max_tokens_per_batch}; media tokens "
                         "cannot be truncated: raise the budget or lower data.max_length")
    vocab = draft_vocab(train, cfg, dataset_fingerprint(data_cfg, target.tokenizer, adapter),
                        target.spec.vocab_size, adapter.draft_vocab_candidates())
    return TrainData(spec=target.spec, vocab=vocab, embed_tokens_weight=target.embed_tokens_weight(),
                     head_weights=target.head_weights,
                     train_batches=_train_batches(list(train["length"]),
                                                  _dataset_fetcher(train, cfg, adapter), cfg, dist),
                     eval_batches=_eval_batches(list(evals["length"]), _dataset_fetcher(evals, cfg, adapter),
                                                cfg, dist),
                     target=target)


def draft_vocab(train, cfg, fingerprint: str, vocab_size: int, candidates: Optional[torch.Tensor] = None
                ) -> Dict[str, torch.Tensor]:
    """The run's draft vocab: reused from <run_dir>/vocab.safetensors when built from the same data, else
    counted.

    Its size is draft.draft_vocab_size, clipped to the target vocab and to the adapter's candidate ids."""
    from data.vocab import build_and_save_vocab, load_vocab

    path = Path(cfg.run_dir) / "vocab.safetensors"
    size = min(cfg.draft.draft_vocab_size, vocab_size)
    if candidates is not None:
        size = min(size, int(candidates.unique().numel()))
    if size < cfg.draft.draft_vocab_size:
        print(f"note: draft.draft_vocab_size={cfg.draft.draft_vocab_size} is more than the {size} token ids "
              f"the target (and modality) can propose: using {size}", flush=True)
    if path.is_file():
        d2t, t2d, _, _ = load_vocab(str(path), fingerprint)  # ValueError when stale
        if d2t.numel() == size:
            return {"d2t": d2t, "t2d": t2d}
    d2t, t2d, _ = build_and_save_vocab(train, vocab_size, size, str(path), fingerprint,
                                       num_proc=cfg.data.num_proc, candidates=candidates)
    return {"d2t": d2t, "t2d": t2d}


def _main_first(dist, build: Callable):
    """Rank 0 builds (and caches) first; the others then read its cache."""
    from trainer.distributed import barrier

    if dist.is_main:
        result = build()
        barrier()
        return result
    barrier()
    return build()


def build_offline_data(cfg, dist) -> TrainData:
    """Batches from the hidden-state store of `aerie dump`; the teacher is the target's norm + lm_head
    alone."""
    from data.store.batch import collate_store
    from data.store.format import MANIFEST
    from data.store.reader import HiddenStateStoreReader
    from models.targets.meta import load_target_embedding, target_spec_from_config
    from models.targets.teacher import load_lm_head_only, target_head_weights

    candidates = build_adapter(cfg, encode=False, offline=True).draft_vocab_candidates()
    store = Path(cfg.store.path)
    reader = HiddenStateStoreReader(str(store / "train"), verify=cfg.store.verify)
    eval_dir = store / "eval"  # an empty eval split dumps nothing
    has_eval = (eval_dir / MANIFEST).is_file() or any(eval_dir.glob(f"part-*/{MANIFEST}"))
    eval_reader = HiddenStateStoreReader(str(eval_dir), verify=cfg.store.verify) if has_eval else None
    spec = target_spec_from_config(cfg.target)
    if list(reader.manifest["aux_layer_ids"]) != list(spec.aux_layer_ids):
        raise ValueError(f"{store}: dumped aux layers {reader.manifest['aux_layer_ids']} differ from the "
                         f"target's {spec.aux_layer_ids}; dump again or set target.aux_layer_ids")
    teacher_head = load_lm_head_only(cfg.target) if reader.manifest["layout"] == "full" else None
    vocab = store_draft_vocab(reader, cfg, spec.vocab_size, candidates)
    packed, budget = cfg.trainer.packed, cfg.trainer.max_tokens_per_batch

    def fetcher(source):
        return lambda indices: collate_store([source.sample(i) for i in indices], packed, budget)

    return TrainData(spec=spec, vocab=vocab, embed_tokens_weight=load_target_embedding(cfg.target.path),
                     head_weights=lambda: target_head_weights(cfg.target, teacher_head),
                     train_batches=_train_batches(reader.all_lengths, fetcher(reader), cfg, dist),
                     eval_batches=_eval_batches(eval_reader.all_lengths if eval_reader else [],
                                                fetcher(eval_reader), cfg, dist),
                     teacher_head=teacher_head)


def store_draft_vocab(reader, cfg, vocab_size: int, candidates: Optional[torch.Tensor] = None
                      ) -> Dict[str, torch.Tensor]:
    """The draft vocab counted over the store's loss-masked tokens, cached in the run dir by store
    fingerprint."""
    import datasets

    rows = {"input_ids": [], "loss_mask": []}
    for input_ids, loss_mask in reader.token_rows():
        rows["input_ids"].append(input_ids.tolist())
        rows["loss_mask"].append(loss_mask.tolist())
    fingerprint = "store-" + str(reader.manifest.get("dataset_fingerprint")
                                 or reader.manifest["target_fingerprint"])
    return draft_vocab(datasets.Dataset.from_dict(rows), cfg, fingerprint, vocab_size, candidates)
