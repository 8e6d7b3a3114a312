#!/usr/bin/env bash
# Maps SLURM's variables to torchrun's when the container is started by srun, then runs the command.
set -euo pipefail
if [[ -n "${SLURM_JOB_NODELIST:-}" && -z "${MASTER_ADDR:-}" ]]; then
  MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" 2>/dev/null | head -n 1 || hostname)
  export MASTER_ADDR
  export MASTER_PORT="${MASTER_PORT:-29500}"
fi
exec "$@"
