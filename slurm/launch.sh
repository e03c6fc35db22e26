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
# Node-local staging of a shard set (data.format=shards; docs/shards.md): with STAGE_DATA=auto ($SLURM_TMPDIR,
# else /tmp) or STAGE_DATA=DIR, one task per node copies data.root there (tools/stage_shards.py: checksums
# checked, skipped when already there, resumed after a kill) and the run reads the copy (a later data.root
# override wins).
if [[ -n "${STAGE_DATA:-}" ]]; then
  SRC=""
  for arg in "$@"; do [[ $arg == data.root=* ]] && SRC="${arg#data.root=}"; done
  if [[ -z $SRC ]]; then
    echo "launch: STAGE_DATA is set but the command has no data.root=...: nothing staged"
  else
    DEST=()
    [[ $STAGE_DATA != auto ]] && DEST=(--dest "$STAGE_DATA")
    STAGE="$(dirname "${BASH_SOURCE[0]}")/../tools/stage_shards.py"
    STAGED="$(srun --ntasks-per-node=1 --ntasks="${SLURM_JOB_NUM_NODES:-1}" --kill-on-bad-exit=1 \
              "$PYTHON" "$STAGE" "$SRC" ${DEST[@]+"${DEST[@]}"} | tail -n 1)"
    set -- "$@" "data.root=$STAGED"
    echo "launch: staged $SRC on each of ${SLURM_JOB_NUM_NODES:-1} node(s): data.root=$STAGED"
  fi
fi
# --kill-on-bad-exit: one failed rank ends the step instead of leaving the others waiting in a collective.
# The run continues from its run directory (run.resume=auto): a requeued job picks up where it stopped.
exec srun --kill-on-bad-exit=1 "$PYTHON" "$@"
