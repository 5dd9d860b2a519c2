#!/bin/bash
# The same two steps with torchrun on one machine (or inside an allocation): a sanity run of the unchanged
# training script, then the training, only if every check passed. torchrun's status is non-zero when any
# rank's is; rank zero writes the report.
#
#   bash examples/slurm/torchrun.sh                      # 2 GPUs
#   NPROC=2 ACCELERATOR=cpu bash examples/slurm/torchrun.sh --max-steps 20     # try it on a laptop's CPU
#
# Extra arguments go to train.py in both steps (e.g. --bug double-softmax to see the sanity run fail).

set -euo pipefail

NPROC=${NPROC:-2}
ACCELERATOR=${ACCELERATOR:-gpu}
TRAIN=(torchrun --standalone --nproc_per_node="$NPROC" examples/slurm/train.py
       --accelerator "$ACCELERATOR" --devices "$NPROC" --strategy ddp "$@")

LIGHTNING_RECIPE_SANITY_RUN=1 "${TRAIN[@]}" || {
    echo "Sanity run failed: see recipe_logs/train/version_*/sanity_run.md for the fix; training not started." >&2
    exit 1
}
"${TRAIN[@]}"
