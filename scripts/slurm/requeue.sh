# Pre-emption for the batch scripts of scripts/slurm/: sourced, then `srun ... & wait_and_requeue $!`.
#
# `#SBATCH --signal=B:USR1@SECONDS` sends SIGUSR1 to this batch shell only (B:), SECONDS before the time limit.
# The shell then sends SIGTERM to every process of the job's steps (`scancel --signal=TERM`, which spares the
# batch shell): the training processes finish their step, write a checkpoint and exit, and torchrun, which
# forwards SIGTERM, exits after them. SIGUSR1 itself would kill torchrun (it does not handle it), and SIGTERM to
# srun would make srun kill its tasks. Once the step has ended, the job is requeued unless the run finished
# (status 0); the requeued job runs the same command, which resumes from the latest checkpoint.
# A SIGTERM to the batch shell (pre-emption, scancel --full) only makes it wait for the step.

preempted=0

on_usr1() {
  preempted=1
  echo "requeue: SIGUSR1 at $(date -u +%FT%TZ): SIGTERM to the steps of job $SLURM_JOB_ID" >&2
  scancel --signal=TERM "$SLURM_JOB_ID" || echo "requeue: scancel failed, the step runs on" >&2
}

trap on_usr1 USR1
trap 'echo "requeue: SIGTERM at $(date -u +%FT%TZ): waiting for the step" >&2' TERM

# Waits for the step, requeues the job if SIGUSR1 came and the step did not finish the run, exits with its status.
# A wait that a signal interrupts returns early, so it is repeated while the step runs; bash keeps the status.
wait_and_requeue() {
  local step=$1 status=0
  while kill -0 "$step" 2>/dev/null; do
    wait "$step" || true
  done
  wait "$step" || status=$?
  if ((preempted && status != 0)); then
    echo "requeue: the step ended with status $status: requeueing job $SLURM_JOB_ID" >&2
    scontrol requeue "$SLURM_JOB_ID"
  fi
  exit "$status"
}
