"""The composed config's schema: each group's dataclass lives next to the code it configures.

`register_configs()` puts them in Hydra's ConfigStore, so `conf/config.yaml` and the YAML
options under conf/<group>/ are checked against them: a misspelt key or a wrong type fails
at start-up with Hydra's message.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, OmegaConf

from data.regen import RegenConfig
from data.serve import ServeConfig
from data.sources import DataConfig
from data.store import StoreConfig
from models.draft.eagle3 import DraftConfig
from models.targets.base import TargetConfig
from trainer.engine import DeepSpeedConfig
from trainer.evaluate import EvalConfig
from trainer.export import ExportConfig
from trainer.logger import LoggerConfig
from trainer.plan import PlanConfig
from trainer.train import TrainerConfig
from trainer.vllm_engine import EngineConfig

REPO_ROOT = Path(__file__).resolve().parents[1]


@dataclass
class LauncherConfig:
    """How the job is started; read by `aerie plan` and the launch/ scripts' docs."""
    name: str = "local"          # local | deepspeed | slurm
    num_nodes: int = 1
    gpus_per_node: int = 1
    gpu_memory_gb: float = 80.0
    hostfile: str = ""
    master_port: int = 29500


@dataclass
class AerieConfig:
    name: str = "default"
    run_dir: str = "outputs/${name}"
    seed: int = 0
    target: TargetConfig = field(default_factory=TargetConfig)
    modality: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    draft: DraftConfig = field(default_factory=DraftConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    regen: RegenConfig = field(default_factory=RegenConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


def _modality_schema(name: str):
    """The adapter's own config dataclass plus the `name` that picks the adapter."""
    from models.registry import MODALITIES

    base = MODALITIES.get(name).config_class
    return dataclasses.make_dataclass(f"{name.title().replace('_', '')}ModalitySchema",
                                      [("name", str, dataclasses.field(default=name))], bases=(base,))


_registered = False


def register_configs() -> None:
    global _registered
    if _registered:
        return
    from hydra.core.config_store import ConfigStore

    from models.registry import MODALITIES

    if not OmegaConf.has_resolver("aerie_root"):
        OmegaConf.register_new_resolver("aerie_root", lambda: str(REPO_ROOT))
    cs = ConfigStore.instance()
    cs.store(name="aerie_schema", node=AerieConfig)
    for name in MODALITIES.names():
        cs.store(group="modality", name=f"{name}_schema", node=_modality_schema(name))
    _registered = True
