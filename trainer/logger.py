"""Run logging shared by every stage: rank-0 progress bar, metrics.jsonl, optional wandb, saved configs."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

from tqdm.auto import tqdm

from data.io import atomic_write_text


@dataclass
class LoggerConfig:
    wandb: bool = False           # also on when WANDB_API_KEY is set
    wandb_project: str = "aerie"
    progress: bool = True


def save_resolved_config(cfg: Any, directory: Path, name: str = "config.yaml") -> Path:
    """Write the fully resolved config next to an output (Hydra DictConfig or plain dict)."""
    from omegaconf import OmegaConf

    text = (OmegaConf.to_yaml(cfg, resolve=True) if OmegaConf.is_config(cfg)
            else OmegaConf.to_yaml(OmegaConf.create(cfg)))
    path = Path(directory) / name
    atomic_write_text(path, text)
    return path


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, list):
        return [_jsonable(v) for v in value]
    return value


class RunLogger:
    """Rank 0 writes; other ranks get a silent logger with the same interface."""

    def __init__(self, cfg: LoggerConfig, run_dir: Path, is_main: bool, total: Optional[int] = None,
                 desc: str = "aerie", config: Any = None, initial: int = 0):
        self.cfg = cfg
        self.is_main = is_main
        self.run_dir = Path(run_dir)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.bar = None
        self.wandb_run = None
        if not is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if cfg.progress and total:
            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)
        if cfg.wandb or os.environ.get("WANDB_API_KEY"):
            self.wandb_run = self._start_wandb(config)

    def _start_wandb(self, config: Any):
        import wandb
        from omegaconf import OmegaConf

        mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        as_dict = OmegaConf.to_container(config, resolve=True) if OmegaConf.is_config(config) else config
        kwargs = dict(project=self.cfg.wandb_project, dir=str(self.run_dir), config=as_dict,
                      name=self.run_dir.name, resume="allow")
        try:
            return wandb.init(mode=mode, **kwargs)
        except Exception as err:  # no network or bad key: keep training, log offline
            print(f"wandb {mode} init failed ({type(err).__name__}: {err}); logging offline")
            return wandb.init(mode="offline", **kwargs)

    def log(self, step: int, metrics: Dict[str, Any]) -> None:
        if not self.is_main:
            return
        record = {"step": step, **{k: _jsonable(v) for k, v in metrics.items()}}
        with open(self.metrics_path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=step)
        if self.bar is not None:
            shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in record.items()
                     if k in ("loss", "acc_0", "tau_sim", "lr", "eval_tau_sim")}
            self.bar.set_postfix(shown, refresh=False)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def print(self, message: str) -> None:
        if self.is_main:
            (self.bar.write if self.bar is not None else print)(message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
