"""The `aerie` console script: one Hydra app per subcommand over the configs in conf/.

    aerie train target=tiny_chat trainer.max_steps=100
    aerie train --cfg job            # print the composed config
    deepspeed --num_gpus 8 --module trainer.cli train deepspeed=zero3   # --local_rank=N is accepted
"""
from __future__ import annotations

import importlib
import os
import sys
from typing import Callable, Dict, List, Optional, Tuple

# name -> ("module:function", one-line help). Each function takes the composed DictConfig.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "train": ("trainer.train:run_train", "train an Eagle3 draft head, online (target in the loop) or offline (from a dump)"),
    "inspect": ("trainer.commands:run_inspect_command", "show a tokenised sample with its loss mask highlighted, and dataset statistics"),
    "vocab": ("trainer.commands:run_vocab_command", "count loss-masked tokens and write the draft vocabulary (d2t / t2d)"),
    "regen": ("trainer.commands:run_regen_command", "regenerate the answers through an OpenAI-compatible server (launch/vllm/serve.sh, SGLang)"),
    "dump": ("trainer.dump:run_dump_command", "run the target once over the data and write the offline hidden-state store"),
    "export": ("trainer.export:run_export", "write a trained draft for vLLM, SGLang or speculators (export.format=...)"),
    "eval": ("trainer.evaluate:run_eval", "speculative decoding with the target: acceptance length, per-position rates"),
    "plan": ("trainer.plan:run_plan", "per-rank GPU memory of online/offline training and the smallest setup that fits"),
    "quickstart": ("trainer.quickstart:run_quickstart", "train, evaluate and export in one go (what `make train` runs)"),
}



def _strip_local_rank(argv: List[str]) -> List[str]:
    """Drop the `--local_rank=N` / `--local_rank N` the deepspeed launcher appends, keeping it in the env."""
    out, skip = [], False
    for i, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg.startswith("--local_rank=") or arg.startswith("--local-rank="):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            skip = True
        else:
            out.append(arg)
    return out


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = ["usage: aerie <command> [hydra overrides ...]", "", "Train Eagle3 draft heads for vLLM and SGLang.", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Every command is a Hydra app over conf/: `aerie <command> --help` lists its config groups,",
              "`aerie <command> --cfg job` prints the composed config, `key=value` overrides any setting."]
    return "\n".join(lines)


def resolve(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _run_hydra(command: str, overrides: List[str]) -> None:
    import hydra

    from trainer.config import REPO_ROOT, register_configs

    register_configs()
    function = resolve(COMMANDS[command][0])

    @hydra.main(version_base=None, config_path=str(REPO_ROOT / "conf"), config_name="config")
    def app(cfg):
        return function(cfg)

    sys.argv = [f"aerie-{command}"] + overrides
    app()


def main(argv: Optional[List[str]] = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, overrides = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"aerie: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    _run_hydra(command, overrides)
    return 0


if __name__ == "__main__":
    sys.exit(main())
