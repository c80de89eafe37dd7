#!/usr/bin/env bash
# The GPU check: one run, one table (benchmarks/gpu_check.py lists the rows), under 8 minutes on one GPU.
#
#   bash benchmarks/gpu_check.sh                          # needs a CUDA device
#   bash benchmarks/gpu_check.sh --dry-run                # every row at toy sizes on the CPU
#   bash benchmarks/gpu_check.sh --markdown table.md      # also write the table to a file
#
# PYTHON picks the interpreter (default: python). The prerequisites are checked first; each missing one
# stops the script with one line and exit status 2.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python}"
dry_run=0
for argument in "$@"; do
    [[ "$argument" == "--dry-run" ]] && dry_run=1
done

fail() { echo "gpu_check: $*" >&2; exit 2; }

command -v "$python" >/dev/null 2>&1 || fail "no Python interpreter '$python' (set PYTHON=/path/to/python)"
"$python" -c "import torch, lightning" 2>/dev/null || fail "torch and lightning do not import in $python"
PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" "$python" -c "import vlm_lab" 2>/dev/null \
    || fail "vlm_lab does not import: run from a checkout with 'pip install -e \".[dev]\" -c constraints.txt'"
"$python" -c "import open_clip" 2>/dev/null \
    || fail "open_clip is not installed (the throughput and LiT rows compare with it): pip install -e \".[bench]\" -c constraints.txt"
if [[ $dry_run == 0 ]]; then
    "$python" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" \
        || fail "no CUDA device (torch.cuda.is_available() is False); --dry-run rehearses every row on the CPU"
fi

exec "$python" "$here/gpu_check.py" "$@"
