"""Checkpoints: the only module that reads or writes them.

Layout under `<run_dir>/ckpt/`:
    step-N/            DeepSpeed's sharded engine state (each rank its own shards; frozen target excluded),
                       trainer_state.json (step, data position, counters, world size), rng/rank-R.pt,
                       config.yaml, vocab.safetensors, manifest.json (file sizes, written last)
    latest             name of the newest complete step dir, replaced atomically after it is complete

A step dir is assembled as `.tmp-step-N` and renamed once every rank has written, so a
crash leaves either a complete checkpoint or a hidden temporary one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch

from trainer.distributed import barrier, broadcast_object
from trainer.logger import atomic_write_text

MANIFEST = "manifest.json"


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """Save / find / load checkpoints of one run; every rank calls save and load together."""

    def __init__(self, root: Path, rank: int, world_size: int, keep_last: int = 2):
        self.root = Path(root)
        self.rank = rank
        self.world_size = world_size
        self.keep_last = keep_last

    # ---- writing -------------------------------------------------------------------------------
    def save(self, step: int, engine, trainer_state: Dict[str, Any], files: Dict[str, bytes]) -> Path:
        """Write step-N: engine shards, per-rank RNG, trainer state and `files` (rank 0), then publish it."""
        final = self.root / f"step-{step}"
        tmp_tag = f".tmp-step-{step}"
        tmp = self.root / tmp_tag
        if self.rank == 0:
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        barrier()
        engine.save_checkpoint(str(self.root), tag=tmp_tag, save_latest=False, exclude_frozen_parameters=True)
        (tmp / "rng").mkdir(exist_ok=True)
        torch.save(rng_state(), tmp / "rng" / f"rank-{self.rank}.pt")
        barrier()
        if self.rank == 0:
            state = {**trainer_state, "step": step, "world_size": self.world_size}
            (tmp / "trainer_state.json").write_text(json.dumps(state, indent=2))
            for name, payload in files.items():
                (tmp / name).write_bytes(payload)
            sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
            (tmp / MANIFEST).write_text(json.dumps({"step": step, "files": sizes}, indent=2))
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / "latest", final.name + "\n")
            self._prune()
        barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.complete_steps()[: -self.keep_last]:
            shutil.rmtree(self.root / f"step-{old}", ignore_errors=True)

    # ---- finding -------------------------------------------------------------------------------
    def complete_steps(self) -> list:
        if not self.root.is_dir():
            return []
        steps = []
        for path in self.root.glob("step-*"):
            suffix = path.name[len("step-"):]
            if path.is_dir() and suffix.isdigit():
                steps.append(int(suffix))
        return sorted(steps)

    def problem(self, path: Path) -> Optional[str]:
        """Why a step dir cannot be resumed from, or None when it is complete."""
        manifest = path / MANIFEST
        if not manifest.is_file():
            return "no manifest.json (incomplete write)"
        try:
            sizes = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError) as err:
            return f"unreadable manifest.json ({err})"
        for name, size in sizes.items():
            file = path / name
            if not file.is_file():
                return f"missing {name}"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, manifest says {size}"
        return None

    def find_resumable(self) -> Optional[Path]:
        """Newest complete checkpoint; newer broken ones are skipped with a warning naming them."""
        found = None
        if self.rank == 0:
            for step in reversed(self.complete_steps()):
                path = self.root / f"step-{step}"
                why = self.problem(path)
                if why is None:
                    found = str(path)
                    break
                warnings.warn(f"skipping checkpoint {path}: {why}")
        found = broadcast_object(found)
        return Path(found) if found else None

    # ---- loading -------------------------------------------------------------------------------
    def load(self, path: Path, engine) -> Dict[str, Any]:
        """Restore engine (and, with the same world size, optimizer + RNG) from `path`; returns trainer state."""
        path = Path(path)
        state = json.loads((path / "trainer_state.json").read_text())
        same_world = state["world_size"] == self.world_size
        if same_world:
            engine.load_checkpoint(str(path.parent), tag=path.name, load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=True)
            rng_file = path / "rng" / f"rank-{self.rank}.pt"
            set_rng_state(torch.load(rng_file, weights_only=False))
        else:
            self._load_resharded(path, engine)
        state["resharded"] = not same_world
        return state

    def _load_resharded(self, path: Path, engine) -> None:
        """Different world size: rebuild the consolidated fp32 draft from the shards and re-partition it."""
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        consolidated = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name)
        module = engine.module
        params, buffers = dict(module.named_parameters()), dict(module.named_buffers())
        unknown = [name for name in consolidated if name not in params and name not in buffers]
        assert not unknown, f"checkpoint has tensors the model lacks: {unknown[:5]}"
        import deepspeed

        for name, value in consolidated.items():
            if name in buffers:
                buffers[name].copy_(value.to(buffers[name].dtype))
                continue
            param = params[name]
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                if self.rank == 0 or not hasattr(param, "ds_id"):
                    param.data.copy_(value.to(param.dtype))
        # the optimizer keeps its own fp32 master copy of the (now overwritten) weights
        engine.optimizer.refresh_fp32_params()
