#!/usr/bin/env bash
# Reproduce the MT10 comparison end to end: sweep (5 methods x 10 seeds), then the tables
# (results/<config>.md) and the learning curves (results/<config>_success*.png).
#
#   scripts/reproduce_mt10.sh [CONFIG] [JOBS] [extra sweep options...]
#   scripts/reproduce_mt10.sh                      # modern protocol (configs/mt10.yaml), 2 jobs
#   scripts/reproduce_mt10.sh mt10-paper 4         # the paper harness's settings
#   scripts/reproduce_mt10.sh smoke 2 --set train.total_steps=200   # a dry run of the pipeline
#
# Re-running it skips finished runs and resumes interrupted ones. Cost: see the README.
set -euo pipefail
config=${1:-mt10}
jobs=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
root=${RL_MTL_RUNS:-runs}
name=$(basename "$config" .yaml)

python -m rl_mtl.sweep --methods nashmtl fairgrad pcgrad cagrad ls --seeds 0-9 \
    --config "$config" --jobs "$jobs" --root "$root" "$@"
mkdir -p results
python -m rl_mtl.evaluate "$root/$name" --format markdown --out "results/$name.md"
python -m rl_mtl.plot "$root/$name" --out results --prefix "$name"
echo "tables: results/$name.md; curves: results/${name}_success.png, results/${name}_success_per_task.png"
