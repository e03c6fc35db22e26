#!/usr/bin/env bash
# Launch logic shared by the sbatch templates (and exercised by tests/test_slurm.py with a fake
# scontrol and srun): the rendezvous address is the first host of the allocation, the port is
# derived from the job id (two jobs on one node do not collide), and srun starts one task per GPU.
# Each task reads its rank from SLURM_PROCID / SLURM_NTASKS / SLURM_LOCALID (engine/distributed.py).
#
#   usage: slurm/launch.sh SCRIPT.py --recipe RECIPE [key=value ...]
set -euo pipefail
: "${SLURM_JOB_ID:?run this inside a SLURM allocation (sbatch slurm/1node.sbatch ...)}"
export MASTER_ADDR="${MASTER_ADDR:-$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)}"
export MASTER_PORT="${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
PYTHON="${PYTHON:-python}"
echo "launch: job $SLURM_JOB_ID, ${SLURM_NTASKS:-1} tasks on ${SLURM_JOB_NUM_NODES:-1} node(s), rendezvous $MASTER_ADDR:$MASTER_PORT, restart ${SLURM_RESTART_COUNT:-0}"
# --kill-on-bad-exit: one failed rank ends the step instead of leaving the others waiting in a collective.
# The run continues from its run directory (run.resume=auto): a requeued job picks up where it stopped.
exec srun --kill-on-bad-exit=1 "$PYTHON" "$@"
