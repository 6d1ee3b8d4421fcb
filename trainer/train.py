"""The Trainer: a config in, a trained draft out.

Online mode runs the frozen target inside each step; offline mode reads a hidden-state
store written by `aerie dump` and rebuilds the teacher from the target's final norm and
lm_head alone.  Both feed the configured objective (models.objectives, conf/objective/) inside one
DeepSpeed engine; its metrics are read generically from the objective's sums.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch
from omegaconf import OmegaConf
from torch import nn


@dataclass
class TrainerConfig:
    mode: str = "online"                 # online | offline
    max_steps: int = 1000                # optimizer steps
    lr: float = 1e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 50
    schedule: str = "cosine"             # cosine | constant
    weight_decay: float = 0.0
    adam_betas: List[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 0.5
    grad_accum_steps: int = 1
    max_tokens_per_batch: int = 4096     # token budget of one micro-batch (rows x padded length)
    packed: bool = True                  # pack conversations into rows (else length-grouped padding)
    precision: str = "auto"              # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    eval_every: int = 100                # 0 disables periodic evaluation
    eval_max_batches: int = 20
    spec_eval_every: int = 0             # real speculative decoding (cfg.eval prompts, k, T) every N steps;
                                         # 0: off
    spec_eval_max_prompts: int = 8
    spec_eval_engine: str = "hf"         # hf (in-process decoder) | vllm (vLLM on an export, `engine` group
                                         # settings)
    ckpt_every: int = 200                # 0: only at the end (and on preemption)
    keep_last: int = 2
    resume: str = "auto"                 # auto | auto_or_fresh (also when every checkpoint is corrupt) |
                                         # never | <step dir>
    max_bad_steps: int = 5               # consecutive non-finite losses before stopping
    fail_on_nonfinite_at: List[int] = field(default_factory=list)  # testing hook: poison these micro-batches


class TrainModule(nn.Module):
    """What the DeepSpeed engine holds: the draft and, online, the frozen target module."""

    def __init__(self, draft: nn.Module, objective, target=None, teacher_head: Optional[nn.Module] = None):
        super().__init__()
        self.draft = draft
        self.objective = objective  # models.objectives: the loss and the metrics' sums of a micro-batch
        if target is not None:
            self.target_module = target.module  # registered so ZeRO-3 partitions and gathers it
        self.teacher_head = teacher_head  # offline, full layout: the target's final norm + lm_head (frozen)
        self.__dict__["_target"] = target  # the TargetModel wrapper, not a submodule

    def teacher(self, batch: Dict[str, torch.Tensor]):
        """(aux_hidden_states, teacher_logits, teacher_argmax, inputs_embeds, position_ids) for a batch.

        Multimodal targets give the draft their merged input embeddings and (M-RoPE) positions, as served."""
        draft_token_ids = self.draft.draft_token_ids()
        with torch.no_grad():
            if self._target is not None:
                out = self._target.forward(batch, draft_token_ids)
                positions = out.position_ids if out.position_ids is not None else batch["position_ids"]
                return (out.aux_hidden_states, out.teacher_logits, out.teacher_argmax, out.inputs_embeds,
                        positions)
            from data.store.batch import teacher_from_store_batch

            logits, argmax = teacher_from_store_batch(batch, self.teacher_head, draft_token_ids)
            return batch["aux_hidden_states"], logits, argmax, None, batch["position_ids"]

    def forward(self, batch: Dict[str, torch.Tensor], noise_seed: Optional[int] = None):
        """The objective's output (loss + metric sums); noise augmentation only in training mode."""
        from models.objectives.base import TeacherInputs

        aux, teacher_logits, teacher_argmax, inputs_embeds, positions = self.teacher(batch)
        inputs = TeacherInputs(batch["input_ids"], aux, teacher_logits, teacher_argmax, batch["loss_mask"],
                               positions, batch["document_ids"], inputs_embeds)
        return self.objective(self.draft, inputs, noise_seed if self.training else None)


class Preemption:
    """SIGTERM / SIGUSR1 (Slurm's warning signal) set a flag (trainer/preemption.py); the loop checkpoints and
    exits."""

    def __init__(self):
        from trainer import preemption

        preemption.install()  # `aerie train` installed it at start-up already; a no-op change then
        self._module = preemption

    @property
    def requested(self) -> bool:
        return self._module.requested()

    def describe(self) -> str:
        return self._module.describe()


def _to_device(batch: Dict[str, Any], device: torch.device) -> Dict[str, Any]:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


class Trainer:
    """Anatomy: config, dist, run_dir, logger, target | teacher_head, data, vocab, draft, engine,
    checkpointer."""

    def __init__(self, cfg, spec_eval: Optional[Callable[["Trainer"], Dict[str, float]]] = None):
        """spec_eval: real speculative decoding of the draft every trainer.spec_eval_every steps (every rank
        calls it; the trainer itself imports no decoding code)."""
        from models.objectives.base import build_objective
        from models.registry import DRAFTS
        from trainer.checkpoint import CheckpointManager
        from trainer.distributed import device_for, init_distributed
        from trainer.engine import build_ds_config, build_engine, lr_multiplier
        from trainer.logger import RunLogger, save_resolved_config

        self.cfg = cfg
        if cfg.trainer.spec_eval_every and spec_eval is None:
            raise ValueError("trainer.spec_eval_every is set but this Trainer has no speculative-eval "
                             "callback (`aerie train` passes one); set trainer.spec_eval_every=0")
        self.spec_eval = spec_eval
        self.preemption = Preemption()
        tcfg: TrainerConfig = cfg.trainer
        if tcfg.mode not in ("online", "offline"):
            raise ValueError(f"trainer.mode must be online or offline, got {tcfg.mode!r}")
        self.dist = init_distributed()
        self.device = device_for(self.dist)
        self.run_dir = Path(cfg.run_dir)
        torch.manual_seed(cfg.seed)
        self.ds_config = build_ds_config(cfg.deepspeed, tcfg, self.dist.world_size)
        if self.dist.is_main:
            save_resolved_config(cfg, self.run_dir)
            (self.run_dir / "ds_config.json").write_text(json.dumps(self.ds_config, indent=2))

        self.target, self.teacher_head = None, None
        self.data = self._build_data()
        self.spec = self.data.spec
        self.vocab = self.data.vocab
        draft_cls = DRAFTS.get(cfg.draft.arch)
        draft_cfg = OmegaConf.to_object(cfg.draft)
        draft_cfg.draft_vocab_size = int(self.vocab["d2t"].numel())  # clipped to the adapter's candidate ids
        self.draft = draft_cls.from_target(draft_cfg, self.spec)
        self.draft.load_embedding(self.data.embed_tokens_weight)
        self.data.embed_tokens_weight = None  # the draft holds its own frozen copy; drop the V x H duplicate
        self.draft.set_draft_vocab(self.vocab["d2t"], self.vocab["t2d"])
        if draft_cfg.init_head == "target":  # else "random" (tools/config.py checks the value)
            self.draft.load_head(*self.data.head_weights())
        self.objective = build_objective(cfg.objective, cfg.draft)
        self.module = TrainModule(self.draft, self.objective, target=self.target,
                                  teacher_head=self.teacher_head)

        self.engine, self.optimizer, self.scheduler = build_engine(
            self.module, self.draft.trainable_parameters(), self.ds_config,
            lambda step: lr_multiplier(step, tcfg.warmup_steps, tcfg.max_steps, tcfg.schedule,
                                       tcfg.min_lr_ratio))
        self.checkpointer = CheckpointManager(self.run_dir / "ckpt", self.dist.rank, self.dist.world_size,
                                              tcfg.keep_last)
        self.step = 0
        self.bad_in_a_row = 0
        self.num_bad_steps = 0
        self.micro_batches_seen = 0
        self.saved_step = None  # step of the newest checkpoint on disk (resumed or written)
        self._totals = None
        self._resume()
        self.logger = RunLogger(cfg.logger, self.run_dir, self.dist.is_main, total=tcfg.max_steps,
                                desc="train", config=cfg, initial=self.step)

    # ---- composition -------------------------------------------------------------------------
    def _build_data(self):
        from trainer.inputs import build_train_data

        data = build_train_data(self.cfg, self.dist, self.ds_config)
        self.target = data.target
        self.teacher_head = data.teacher_head
        return data

    def _resume(self) -> None:
        """Load the checkpoint trainer.resume names (auto: the newest intact one); otherwise start clean."""
        resume = self.cfg.trainer.resume
        path = None
        if resume in ("auto", "auto_or_fresh"):
            path = self.checkpointer.find_resumable()
            if path is None and self.checkpointer.complete_steps() and resume == "auto":
                raise ValueError(f"no usable checkpoint in {self.checkpointer.root}: every step dir failed "
                                 f"verification (warnings above); trainer.resume=auto_or_fresh trains from "
                                 f"scratch and moves them aside")
        elif resume != "never":
            path = Path(resume)
            why = self.checkpointer.problem(path) if path.is_dir() else "no such directory"
            if why is not None:
                raise ValueError(f"trainer.resume={resume}: {why}")
        if path is None:
            self._start_fresh()
            return
        state = self.checkpointer.load(path, self.engine)
        self.step = self.saved_step = state["step"]
        self.bad_in_a_row = state.get("bad_in_a_row", 0)
        self.num_bad_steps = state.get("num_bad_steps", 0)
        self.micro_batches_seen = state["micro_batches_seen"]
        if state["resharded"]:
            self.scheduler.last_epoch = self.step
            for group, lr in zip(self.optimizer.param_groups, self.scheduler.get_lr()):
                group["lr"] = lr
            self.data.train_batches.resume_from_global(state["micro_batches_seen"], state["world_size"])
            msg = (f"resumed from {path} (saved on {state['world_size']} ranks, now {self.dist.world_size}): "
                   f"draft weights re-partitioned from the consolidated state; optimizer moments restart")
        else:
            self.data.train_batches.load_state_dict(state["sampler"])
            msg = f"resumed from {path} at step {self.step}"
        if self.dist.is_main:
            print(msg, flush=True)
            _truncate_metrics(self.run_dir / "metrics.jsonl", self.step)

    def _start_fresh(self) -> None:
        """Training from step 0: rows of a run that died before its first checkpoint are dropped; an earlier
        run's checkpoints, final/ and metrics (trainer.resume=never or auto_or_fresh) are moved aside, not
        mixed in."""
        from trainer.distributed import barrier

        if self.dist.is_main:
            metrics, final = self.run_dir / "metrics.jsonl", self.run_dir / "final"
            if self.checkpointer.complete_steps() or final.exists():
                aside = self.run_dir / f"replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
                aside.mkdir(parents=True)
                moved = [p for p in (self.checkpointer.root, final, metrics) if p.exists()]
                for old in moved:
                    os.replace(old, aside / old.name)
                print(f"training from scratch: the earlier run's {', '.join(p.name for p in moved)} moved to "
                      f"{aside}", flush=True)
            elif metrics.exists():
                metrics.unlink()
        barrier()

    # ---- one step ----------------------------------------------------------------------------
    def _forward(self, batch):
        # noise drawn per micro-batch from (seed, micro-batch index): a resumed run sees the same noise
        noise_seed = self.cfg.seed * 1_000_003 + self.micro_batches_seen
        return self.engine(_to_device(batch, self.device), noise_seed=noise_seed)

    def _all_finite(self, loss: torch.Tensor) -> bool:
        from trainer.distributed import all_reduce_sum

        bad = torch.tensor([0.0 if torch.isfinite(loss).item() else 1.0])
        return all_reduce_sum(bad).item() == 0

    def train_step(self) -> Optional[Dict[str, float]]:
        """Micro-batches until DeepSpeed takes one optimizer step; None when a non-finite loss skipped one.

        A skipped micro-batch gets no backward and no engine step, so the accumulation carries on
        with the next good one and the optimizer only ever sees finite gradients.
        """
        while True:
            batch = next(self.data.train_batches)
            self.micro_batches_seen += 1
            out = self._forward(batch)
            loss = out.loss
            if self.micro_batches_seen in self.cfg.trainer.fail_on_nonfinite_at:
                loss = loss * float("nan")
            if not self._all_finite(loss):
                self.num_bad_steps += 1
                self.bad_in_a_row += 1
                return None
            boundary = self.engine.is_gradient_accumulation_boundary()
            self.engine.backward(loss)
            self.engine.step()
            self._totals = _accumulate(self._totals, out)
            if boundary:
                break
        totals, self._totals = self._totals, None
        self.bad_in_a_row = 0
        self.step += 1
        return self.objective.summarise(totals)

    # ---- loop --------------------------------------------------------------------------------
    def fit(self) -> Path:
        tcfg: TrainerConfig = self.cfg.trainer
        final = self.run_dir / "final"
        if self.step >= tcfg.max_steps and all((final / n).is_file()
                                               for n in ("model.safetensors", "config.yaml")):
            self.logger.print(f"already trained to step {self.step} (trainer.max_steps={tcfg.max_steps}); "
                              f"the draft is in {final}; raise trainer.max_steps to continue")
            self.logger.close()
            return final
        self.engine.train()
        started = time.time()
        if self._preempted():  # the notice came during start-up
            return self._exit_preempted()
        while self.step < tcfg.max_steps:
            lr = self.optimizer.param_groups[0]["lr"]
            metrics = self.train_step()
            if metrics is None:
                self.logger.print(f"non-finite loss at micro-batch {self.micro_batches_seen}: step skipped "
                                  f"({self.bad_in_a_row} in a row, {self.num_bad_steps} in all)")
                if self.bad_in_a_row > tcfg.max_bad_steps:
                    self.save_checkpoint()
                    raise RuntimeError(f"{self.bad_in_a_row} non-finite losses in a row "
                                       f"(trainer.max_bad_steps={tcfg.max_bad_steps}); checkpoint saved at "
                                       f"step {self.step} in {self.run_dir / 'ckpt'}; lower trainer.lr or "
                                       f"check the data")
                continue
            metrics.update(lr=lr, num_bad_steps=self.num_bad_steps,
                           elapsed_s=round(time.time() - started, 3))
            if tcfg.eval_every and self.step % tcfg.eval_every == 0:
                metrics.update({f"eval_{k}": v for k, v in self.evaluate().items()})
            if tcfg.spec_eval_every and self.step % tcfg.spec_eval_every == 0:
                metrics.update(self.speculative_eval())
            self.logger.log(self.step, metrics)
            self.logger.advance()
            if tcfg.ckpt_every and self.step % tcfg.ckpt_every == 0 and self.step < tcfg.max_steps:
                self.save_checkpoint()
            if self._preempted():
                return self._exit_preempted()
        if self.saved_step != self.step:
            self.save_checkpoint()
        final = self.save_final()
        self.logger.close()
        return final

    def _exit_preempted(self) -> Path:
        """Checkpoint what the last checkpoint lacks, say so, and return the run dir (a clean exit)."""
        if self.step and self.saved_step != self.step:
            self.save_checkpoint()
            what = f"checkpoint written at step {self.step}"
        elif self.step:
            what = f"the checkpoint of step {self.step} is already on disk"
        else:
            what = "no step taken yet, nothing to checkpoint"
        self.logger.print(f"preempted at step {self.step} ({self.preemption.describe()}): {what}; exiting")
        self.logger.close()
        return self.run_dir

    def _preempted(self) -> bool:
        from trainer.distributed import all_reduce_sum

        flag = torch.tensor([1.0 if self.preemption.requested else 0.0])
        return all_reduce_sum(flag).item() > 0

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        from trainer.distributed import all_reduce_sum

        self.engine.eval()
        totals = None
        for index, batch in enumerate(self.data.eval_batches()):
            if index >= self.cfg.trainer.eval_max_batches:
                break
            totals = _accumulate(totals, self._forward(batch))
        self.engine.train()
        if totals is None:
            return {}
        keys = sorted(totals)
        flat = torch.cat([totals[k].reshape(-1) for k in keys])
        all_reduce_sum(flat)
        summed, offset = {}, 0
        for key in keys:
            size = totals[key].numel()
            summed[key] = flat[offset:offset + size].reshape(totals[key].shape)
            offset += size
        return self.objective.summarise(summed)

    def speculative_eval(self) -> Dict[str, float]:
        """Acceptance metrics of the current draft from the injected callback (`aerie train`:
        tools/eval/in_loop.py)."""
        return self.spec_eval(self)

    # ---- outputs -----------------------------------------------------------------------------
    def checkpoint_files(self) -> Dict[str, bytes]:
        from omegaconf import OmegaConf
        from safetensors.torch import save

        return {
            "config.yaml": OmegaConf.to_yaml(self.cfg, resolve=True).encode(),
            "vocab.safetensors": save({"d2t": self.vocab["d2t"].contiguous(),
                                       "t2d": self.vocab["t2d"].contiguous()}),
        }

    def save_checkpoint(self) -> Path:
        state = {"micro_batches_seen": self.micro_batches_seen, "bad_in_a_row": self.bad_in_a_row,
                 "num_bad_steps": self.num_bad_steps, "sampler": self.data.train_batches.state_dict()}
        path = self.checkpointer.save(self.step, self.engine, state, self.checkpoint_files())
        self.saved_step = self.step
        return path

    def save_final(self) -> Path:
        from models.draft.io import save_aerie_draft
        from trainer.distributed import barrier

        final = self.run_dir / "final"
        state = gathered_draft_state(self.draft)
        if self.dist.is_main:  # config.yaml goes in the same atomic directory write as the weights
            config_yaml = OmegaConf.to_yaml(self.cfg, resolve=True).encode()
            save_aerie_draft(self.draft, final, state_dict=state, extra_files={"config.yaml": config_yaml},
                             metadata={"target": self.spec.name_or_path, "step": self.step})
        barrier()
        return final


def gathered_draft_state(draft: nn.Module) -> Dict[str, torch.Tensor]:
    """Full draft weights on every rank (gathering ZeRO-3 partitions), frozen embedding excluded."""
    import deepspeed

    params = [p for n, p in draft.named_parameters() if not n.startswith("embed_tokens")]
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        return {n: t.detach().clone().float() if t.is_floating_point() else t.detach().clone()
                for n, t in draft.state_dict().items() if not n.startswith("embed_tokens")}


def _accumulate(totals, out):
    """Running sums of the objective's detached `sums` over micro-batches."""
    fresh = {k: v.detach().float() for k, v in out.sums.items()}
    if totals is None:
        return fresh
    return {k: totals[k] + fresh[k] for k in fresh}


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop records logged after `step` by a run that died before its next checkpoint, and torn lines
    (a kill or a full disk in the middle of a write)."""
    if not path.is_file():
        return
    from data.io import atomic_write_text

    kept, num_torn = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            num_torn += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    if num_torn:
        print(f"{path}: dropped {num_torn} unreadable line(s) (cut off by a kill or a full disk)", flush=True)
    atomic_write_text(path, "".join(line + "\n" for line in kept))
