#!/usr/bin/env bash
# AERIE_PYTHON for the launch tests before the real trainer: `-m trainer.cli ...` runs standin_trainer.py.
PY=${STANDIN_REAL_PYTHON:-python}
if [ "${1:-}" = -m ] && [ "${2:-}" = trainer.cli ]; then
    shift 2
    exec "$PY" "$(dirname "$0")/standin_trainer.py" "$@"
fi
exec "$PY" "$@"
