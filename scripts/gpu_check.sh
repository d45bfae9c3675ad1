#!/usr/bin/env bash
# Everything rl-mtl checks on a CUDA machine, as one command (README: "Checking a GPU").
#
#   scripts/gpu_check.sh [--dry-run] [RESULTS_DIR]
#       Installs the wheels in .whl/ (if any) next to the machine's own torch, runs the CUDA tests
#       (pytest -m cuda), times `bench train --device cuda` (S = 10 and S = 1 seeds together; eager,
#       whole-update compiled and CUDA-graph modes; async envs), writes every result as JSON into
#       RESULTS_DIR (or $GPU_CHECK_RESULTS; default gpu-check-results/) and ends with one verdict
#       line per speed goal. Without CUDA, or with --dry-run, it stops after the install and import
#       checks and says so (exit 0). Phases that would overrun $GPU_CHECK_BUDGET_S (default 500 s)
#       are skipped and reported as skipped.
#
#   scripts/gpu_check.sh --download-wheels [PYTHON_VERSION]
#       On a machine with internet: downloads into .whl/ the wheels of the packages a CUDA machine's
#       image may lack (Meta-World, MuJoCo, Gymnasium), at the versions constraints.txt pins, for
#       CPython PYTHON_VERSION (default 3.12) on x86-64 Linux.
#
# Environment: PYTHON (default python3: the one whose torch has CUDA), GPU_CHECK_WHEELS (.whl).
set -uo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-.whl}
BUDGET_S=${GPU_CHECK_BUDGET_S:-500}
# What a CUDA image with PyTorch usually lacks (about 47 MB of wheels); everything else the checks
# import (numpy, scipy, yaml, tensorboard, safetensors, tqdm, imageio, etils, pytest) it has. Left
# out, to stay small: cvxpy and its solvers (scs alone is 43 MB), torchjd and ray, used only by
# CPU-side cross-checks that `pytest -m cuda` does not select.
CARRIED="gymnasium Farama-Notifications metaworld mujoco glfw PyOpenGL"

say() { printf 'gpu_check: %s\n' "$*"; }
die() { say "error: $*" >&2; exit 1; }

if [[ ${1:-} == --download-wheels ]]; then
    version=${2:-3.12}
    mkdir -p "$WHEELS"
    pins=()
    for name in $CARRIED; do
        pin=$(grep -i "^${name}==" constraints.txt) || die "constraints.txt pins no version of $name"
        pins+=("$pin")
    done
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
        manylinux2014_x86_64 manylinux1_x86_64; do
        platforms+=(--platform "$p")
    done
    "$PY" -m pip download --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        "${platforms[@]}" -d "$WHEELS" "${pins[@]}" || die "pip download failed (see above)"
    say "$(find "$WHEELS" -name '*.whl' | wc -l) wheels in $WHEELS ($(du -sh "$WHEELS" | cut -f1)); carry them to the CUDA machine"
    exit 0
fi

dry_run=0
if [[ ${1:-} == --dry-run ]]; then
    dry_run=1
    shift
fi
[[ ${1:-} == -* ]] && die "unknown option $1 (usage: scripts/gpu_check.sh [--dry-run] [RESULTS_DIR] | --download-wheels [PYTHON_VERSION])"
RESULTS=${1:-${GPU_CHECK_RESULTS:-gpu-check-results}}
mkdir -p "$RESULTS" || die "cannot create the results folder $RESULTS"
start=$SECONDS

# 1. Install: the carried wheels into a private folder, next to (never over) the machine's torch.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
shopt -s nullglob
wheels=("$WHEELS"/*.whl)
if ((${#wheels[@]})); then
    site=$(mktemp -d "${TMPDIR:-/tmp}/rl-mtl-site.XXXXXX")
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" "${wheels[@]}" \
        || die "installing the wheels in $WHEELS failed (see above)"
    export PYTHONPATH="$site:$PYTHONPATH"
    say "installed ${#wheels[@]} wheels from $WHEELS"
else
    say "no wheels in $WHEELS: using the packages already installed"
fi

# 2. Imports and the device, recorded.
"$PY" - "$RESULTS/environment.json" <<'EOF' || die "an import failed: carry the missing package as a wheel (scripts/gpu_check.sh --download-wheels)"
import json, platform, sys
import torch, gymnasium, metaworld, mujoco  # noqa: E401 (what training needs)
import rl_mtl
from rl_mtl.bench.train import run  # noqa: F401 (the benchmark imports)
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available(), "rl_mtl": rl_mtl.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "mujoco": mujoco.__version__, "gymnasium": gymnasium.__version__}
open(sys.argv[1], "w").write(json.dumps(info, indent=2))
print("gpu_check: imports ok:", ", ".join(f"{k} {v}" for k, v in info.items()))
EOF
cuda=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
if ((dry_run)) || [[ $cuda != 1 ]]; then
    reason=$( ((dry_run)) && echo "--dry-run" || echo "no CUDA device (torch.cuda.is_available() is False)")
    say "dry run ($reason): install and imports checked; no tests run, nothing measured"
    exit 0
fi

# 3. The CUDA tests, then the benchmarks, each phase within what is left of the budget.
status=0
phase() {  # phase NAME SECONDS COMMAND...: run COMMAND if SECONDS fit the budget, log into RESULTS
    local name=$1 need=$2
    shift 2
    local left=$((BUDGET_S - (SECONDS - start)))
    if ((left < need)); then
        say "SKIPPED $name: needs ~${need}s, ${left}s of the ${BUDGET_S}s budget left"
        return
    fi
    say "$name (at most ${left}s)"
    timeout --signal=INT "$left" "$@" 2>&1 | tee "$RESULTS/$name.log"
    local rc=${PIPESTATUS[0]}
    ((rc == 0)) || { say "FAILED $name (exit $rc; log: $RESULTS/$name.log)"; status=1; }
}
export PYTHONUNBUFFERED=1
phase cuda-tests 60 "$PY" -m pytest -m cuda -q -p no:cacheprovider --junitxml "$RESULTS/cuda-tests.xml"
bench=("$PY" -m rl_mtl.bench train --device cuda --steps 50 --rounds 3 --set env.vector_strategy=async)
phase train-s10 150 "${bench[@]}" --seeds 10 --methods ls nashmtl --compile off whole graphs --json "$RESULTS/train-s10.json"
phase train-s1 120 "${bench[@]}" --seeds 1 --methods ls nashmtl --compile off whole graphs --json "$RESULTS/train-s1.json"
phase train-s10-more 150 "${bench[@]}" --seeds 10 --methods ls fairgrad pcgrad cagrad --compile off passes whole \
    --json "$RESULTS/train-s10-more.json"

# 4. The verdicts.
measured=("$RESULTS"/train-*.json)
if ((${#measured[@]})); then
    "$PY" -m rl_mtl.bench goals "${measured[@]}" --json "$RESULTS/goals.json" | sed 's/^/gpu_check: /' || status=1
else
    say "NOT MEASURED: no benchmark finished; no verdicts"
    status=1
fi
say "done in $((SECONDS - start))s; results in $RESULTS"
exit $status
