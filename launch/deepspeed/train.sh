#!/usr/bin/env bash
# Aerie training through the DeepSpeed launcher, single or multi-node.
#
#   launch/deepspeed/train.sh --num_gpus 8 target=llama3_8b trainer.max_steps=1000
#   launch/deepspeed/train.sh --hostfile hosts --master_addr 10.0.0.1 deepspeed=zero3 ...  (ssh/pdsh to the hosts)
#   launch/deepspeed/train.sh --hostfile hosts --master_addr 10.0.0.1 --no_ssh --node_rank R ...  (run on each node)
#
# Leading `--options` go to the launcher (`--opt value` or `--opt=value`; see `deepspeed --help`), everything
# from the first argument that is not an option (or after `--`) is passed to `aerie train` unchanged as Hydra
# overrides. Ranks get RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT from the launcher.
# Env: AERIE_PYTHON (default `python`; must have deepspeed and aerie importable), AERIE_ROOT (default: this
# repository; the launch runs from there). On SIGTERM/SIGINT the launcher forwards SIGTERM to the ranks, which
# checkpoint and exit, but it then exits with code 1 and SIGKILLs ranks still alive after 30 s.
set -euo pipefail

AERIE_ROOT=${AERIE_ROOT:-$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)}
AERIE_PYTHON=${AERIE_PYTHON:-python}

launcher_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --) shift; break ;;
        --*=*) launcher_args+=("$1"); shift ;;
        --*)
            # an option's value is the next argument unless that is another option or a Hydra override (has '=')
            if [ $# -ge 2 ] && [[ "$2" != -* && "$2" != *=* ]]; then
                launcher_args+=("$1" "$2"); shift 2
            else
                launcher_args+=("$1"); shift
            fi ;;
        *) break ;;
    esac
done

cd "$AERIE_ROOT"
exec "$AERIE_PYTHON" -m deepspeed.launcher.runner --no_local_rank "${launcher_args[@]}" \
    --module tools.cli train "$@"
