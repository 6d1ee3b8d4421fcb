# Shared body of the Aerie sbatch scripts (sourced, not run): environment, logs and the preemption loop.
#
# Env overrides: AERIE_ROOT (repository; default the submit dir), AERIE_PYTHON (default `python`),
# AERIE_LOG_DIR (every rank's log; default <root>/launch/slurm/logs), AERIE_RUN_ROOT (default <root>/outputs),
# AERIE_RUN_DIR (default <run root>/<job name>), AERIE_MAX_RESTARTS (requeues allowed; default 20),
# MASTER_PORT (default 29500 + job id % 1000).

set -uo pipefail

AERIE_ROOT=${AERIE_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
cd "$AERIE_ROOT" || { echo "aerie: cannot cd to AERIE_ROOT=$AERIE_ROOT" >&2; exit 1; }
AERIE_PYTHON=${AERIE_PYTHON:-python}
AERIE_LOG_DIR=${AERIE_LOG_DIR:-$AERIE_ROOT/launch/slurm/logs}
mkdir -p "$AERIE_LOG_DIR"

# One rendezvous for every task: the first node of the allocation; ranks come from SLURM_PROCID per task.
unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)
export MASTER_ADDR
export MASTER_PORT=${MASTER_PORT:-$((29500 + SLURM_JOB_ID % 1000))}
export PYTHONUNBUFFERED=1

aerie_log() { echo "[aerie $(date +%H:%M:%S) job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}] $*"; }

# Sets AERIE_OVERRIDES (the given overrides, plus run_dir=<run root>/<job name> unless they choose it with run_dir=
# or name=) and RUN_DIR: deterministic, identical on every rank and across requeues.
aerie_resolve_run_dir() {
    local arg chosen=""
    RUN_DIR=${AERIE_RUN_DIR:-${AERIE_RUN_ROOT:-$AERIE_ROOT/outputs}/$SLURM_JOB_NAME}
    for arg in "$@"; do
        case "$arg" in
            run_dir=*|+run_dir=*|++run_dir=*) RUN_DIR=${arg#*run_dir=}; chosen=1 ;;
            name=*|++name=*) [ "$chosen" != 1 ] && RUN_DIR=outputs/${arg#*name=}; chosen=${chosen:-name} ;;
        esac
    done
    case "$RUN_DIR" in /*) ;; *) RUN_DIR=$AERIE_ROOT/$RUN_DIR ;; esac
    AERIE_OVERRIDES=("$@")
    [ -n "$chosen" ] || AERIE_OVERRIDES+=("run_dir=$RUN_DIR")
}

# aerie_srun_requeue FINISHED_MARKER -- CMD...
#   Runs CMD as one task per allocated slot (logs: <log dir>/<job name>-<job id>-rank<N>.out, appended across
#   requeues). SIGUSR1 to the batch shell (`#SBATCH --signal=B:USR1@T` or `scancel --batch -s USR1`) is forwarded
#   to every task; once they have checkpointed and exited the job requeues itself unless FINISHED_MARKER (a path; may be
#   empty) exists.
#   SIGTERM (scancel, time limit) is forwarded without requeueing.
aerie_srun_requeue() {
    local finished=$1; shift
    [ "$1" = "--" ] && shift
    local signalled="" srun_pid rc
    trap 'signalled=USR1; aerie_log "SIGUSR1: asking the tasks to checkpoint"; kill -USR1 "$srun_pid" 2>/dev/null' USR1
    trap 'signalled=TERM; aerie_log "SIGTERM: forwarding"; kill -TERM "$srun_pid" 2>/dev/null' TERM
    aerie_log "nodes $SLURM_JOB_NODELIST, $SLURM_NTASKS tasks, master $MASTER_ADDR:$MASTER_PORT"
    aerie_log "running: $*"
    srun --kill-on-bad-exit=1 --open-mode=append --output="$AERIE_LOG_DIR/%x-%j-rank%t.out" "$@" &
    srun_pid=$!
    # `wait` returns early when a trapped signal arrives; keep waiting until srun itself exits.
    while :; do
        wait "$srun_pid"; rc=$?
        kill -0 "$srun_pid" 2>/dev/null || break
    done
    trap - USR1 TERM
    aerie_log "tasks exited with code $rc"
    if [ "$signalled" = USR1 ]; then
        if [ -n "$finished" ] && [ -e "$finished" ]; then
            aerie_log "already finished ($finished exists); not requeueing"
        elif [ "${SLURM_RESTART_COUNT:-0}" -ge "${AERIE_MAX_RESTARTS:-20}" ]; then
            aerie_log "restart limit AERIE_MAX_RESTARTS=${AERIE_MAX_RESTARTS:-20} reached; not requeueing"
        else
            aerie_log "requeueing; the next run resumes from the last checkpoint"
            scontrol requeue "$SLURM_JOB_ID" && exit 0
            aerie_log "scontrol requeue failed"
            exit 1
        fi
    fi
    exit "$rc"
}
