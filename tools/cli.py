"""The `aerie` console script: one Hydra app per subcommand over the configs in conf/.

    aerie train target=tiny_chat trainer.max_steps=100
    aerie train --cfg job            # print the composed config
    deepspeed --num_gpus 8 --module tools.cli train deepspeed=zero3   # --local_rank=N is accepted

A failing command prints one line, `aerie <command>: error: <what and where>`, and exits 1; the traceback
comes only with `--debug` (anywhere on the command line) or AERIE_DEBUG=1.
"""
from __future__ import annotations

import importlib
import os
import sys
import traceback
from typing import Callable, Dict, List, Optional, Tuple

# name -> ("module:function", one-line help). Each function takes the composed DictConfig.
COMMANDS: Dict[str, Tuple[str, str]] = {
    "train": ("tools.commands:run_train_command",
              "train a draft (draft=eagle3_llama, dflash, ...), "
              "online (target in the loop) or offline (from a dump)"),
    "inspect": ("tools.commands:run_inspect_command",
                "show a tokenised sample with its loss mask highlighted, and dataset statistics"),
    "vocab": ("tools.commands:run_vocab_command",
              "count loss-masked tokens and write the draft vocabulary (d2t / t2d)"),
    "regen": ("tools.commands:run_regen_command",
              "regenerate the answers through an OpenAI-compatible server "
              "(launch/vllm/serve.sh, SGLang)"),
    "dump": ("tools.dump:run_dump_command",
             "run the target once over the data and write the offline hidden-state store"),
    "export": ("tools.export.base:run_export",
               "write a trained draft for vLLM, SGLang or speculators (export.format=...)"),
    "eval": ("tools.eval.run:run_eval",
             "speculative decoding with the target: acceptance length, per-position rates"),
    "plan": ("tools.plan:run_plan",
             "per-rank GPU memory of online/offline training and the smallest setup that fits"),
    "quickstart": ("tools.quickstart:run_quickstart",
                   "train, evaluate and export in one go (what `make train` runs)"),
}
# command -> its root config in conf/ (the roots share conf/base.yaml and the groups)
CONFIG_ROOTS: Dict[str, str] = {"train": "train", "dump": "train", "quickstart": "train", "eval": "eval",
                                "export": "export", "plan": "plan",
                                "inspect": "data", "vocab": "data", "regen": "data"}



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
    lines = ["usage: aerie <command> [hydra overrides ...]", "",
             "Train speculative-decoding drafts for vLLM and SGLang.", "",
             "commands:"]
    lines += [f"  {name.ljust(width)}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "Every command is a Hydra app over conf/: "
                  "`aerie <command> --help` lists its config groups,",
              "`aerie <command> --cfg job` prints the composed config, `key=value` overrides any setting."]
    return "\n".join(lines)


def resolve(target: str) -> Callable:
    module, _, attr = target.partition(":")
    return getattr(importlib.import_module(module), attr)


def _run_hydra(command: str, overrides: List[str]) -> None:
    """Compose the config and run the command; its first exception is raised here (not printed by Hydra)."""
    import hydra

    from tools.config import REPO_ROOT, register_configs, validate_config

    register_configs()
    function = resolve(COMMANDS[command][0])
    failures: List[BaseException] = []

    @hydra.main(version_base=None, config_path=str(REPO_ROOT / "conf"), config_name=CONFIG_ROOTS[command])
    def app(cfg):
        try:
            validate_config(cfg, command)
            return function(cfg)
        except Exception as err:  # re-raised below: Hydra would print its own header and traceback
            failures.append(err)

    sys.argv = [f"aerie-{command}"] + overrides
    os.environ["HYDRA_FULL_ERROR"] = "1"  # composition errors propagate instead of being printed
    app()
    if failures:
        raise failures[0]


def one_line(err: BaseException) -> str:
    """An exception as one line: its message (and, for config errors, their cause) with newlines folded."""
    parts = [str(err)]
    if err.__cause__ is not None and str(err.__cause__) not in parts[0]:
        parts.append(str(err.__cause__))
    lines = [line.strip() for part in parts for line in part.splitlines()
             if line.strip() and not line.strip().startswith(("reference_type=", "object_type="))]
    text = "; ".join(dict.fromkeys(lines)) or type(err).__name__
    if not isinstance(err, (ValueError, OSError)) and not type(err).__module__.startswith(
            ("hydra", "omegaconf")):
        text = f"{type(err).__name__}: {text}"
    return text if len(text) <= 600 else text[:597] + "..."


def main(argv: Optional[List[str]] = None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    command, overrides = argv[0], [a for a in argv[1:] if a != "--debug"]
    debug = "--debug" in argv[1:] or os.environ.get("AERIE_DEBUG", "") not in ("", "0")
    if command not in COMMANDS:
        print(f"aerie: unknown command {command!r}\n\n{usage()}", file=sys.stderr)
        return 2
    if command in ("train", "quickstart"):
        from trainer import preemption

        preemption.install()  # before the slow imports: a notice during start-up must not kill silently
    try:
        _run_hydra(command, overrides)
    except KeyboardInterrupt:
        print(f"aerie {command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (traceback: --debug)"
        print(f"aerie {command}: error: {one_line(err)}{hint}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
