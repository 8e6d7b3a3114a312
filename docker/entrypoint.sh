#!/usr/bin/env bash
# Runs a command, first mapping SLURM's job layout to what the launcher needs when started by srun.
#
# The image's entrypoint, and the task command of scripts/slurm/train.sbatch and
# scripts/slurm/train_per_gpu.sbatch, so the mapping lives in this one file:
#
# * `torchrun ...` (one task per node): torchrun gets --nnodes, --node-rank, --nproc-per-node
#   and a c10d rendezvous on the first node of the job, with the job id as rendezvous id.
#   Options the command gives itself come after these and win (argparse keeps the last).
#   TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (unless set) makes restarts reliable.
# * any other command (one task per GPU, e.g. `python -m sface_dist.train`): MASTER_ADDR,
#   MASTER_PORT, RANK, WORLD_SIZE and LOCAL_RANK are exported from SLURM_PROCID,
#   SLURM_NTASKS and SLURM_LOCALID, and the command runs as it is.
#
# Outside SLURM (no SLURM_JOB_ID) the command runs unchanged. MASTER_ADDR and MASTER_PORT
# (default 29500, also the rendezvous port) are kept when already set.
set -euo pipefail

die() {
  echo "entrypoint: $*" >&2
  exit 2
}

# The first host of a SLURM node list such as `node[03-05,07],gpu1` (node03), for when scontrol is absent.
first_host_of() {
  local rest=$1 host="" inner
  while [[ $rest =~ ^([^],[]*)\[([^]]*)\](.*)$ ]]; do
    inner=${BASH_REMATCH[2]}
    host+=${BASH_REMATCH[1]}${inner%%[,-]*}
    rest=${BASH_REMATCH[3]}
  done
  host+=${rest%%,*}
  echo "$host"
}

first_node() {
  local host=""
  if command -v scontrol >/dev/null 2>&1; then
    host=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
  fi
  [[ -n $host ]] || host=$(first_host_of "$SLURM_JOB_NODELIST")
  [[ -n $host ]] || die "SLURM_JOB_NODELIST='$SLURM_JOB_NODELIST' names no host"
  echo "$host"
}

require() {
  local name
  for name in "$@"; do
    [[ -n ${!name:-} ]] || die "$name is not set: start the command with srun inside a SLURM job"
  done
}

(($# > 0)) || die "no command given, e.g. torchrun -m sface_dist.train configs/ms1m.yaml"

if [[ -z ${SLURM_JOB_ID:-} ]]; then
  exec "$@"
fi

require SLURM_JOB_NODELIST
MASTER_ADDR=${MASTER_ADDR:-$(first_node)}
MASTER_PORT=${MASTER_PORT:-29500}

if [[ $(basename "$1") == torchrun ]]; then
  require SLURM_NNODES SLURM_NODEID SLURM_NTASKS
  ((SLURM_NTASKS == SLURM_NNODES)) ||
    die "torchrun needs one task per node, got SLURM_NTASKS=$SLURM_NTASKS on SLURM_NNODES=$SLURM_NNODES" \
      "(srun --ntasks-per-node=1, or run python directly with one task per GPU)"
  # A restarted attempt (--max-restarts, elastic membership) meets in a fresh store instead of the one the failed
  # attempt's ranks published their addresses in (docs/multinode.md, Restarts after a failure).
  export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}
  launcher=$1
  shift
  set -- "$launcher" \
    --nnodes="$SLURM_NNODES" \
    --node-rank="$SLURM_NODEID" \
    --nproc-per-node="${SLURM_GPUS_ON_NODE:-gpu}" \
    --rdzv-backend=c10d \
    --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" \
    --rdzv-id="$SLURM_JOB_ID" \
    "$@"
else
  require SLURM_PROCID SLURM_NTASKS SLURM_LOCALID
  export MASTER_ADDR MASTER_PORT
  export RANK=$SLURM_PROCID WORLD_SIZE=$SLURM_NTASKS LOCAL_RANK=$SLURM_LOCALID
  ((RANK > 0)) || echo "entrypoint: $WORLD_SIZE tasks, MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT" >&2
fi
echo "entrypoint: $*" >&2
exec "$@"
