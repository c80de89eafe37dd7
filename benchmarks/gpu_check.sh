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
# The other prerequisites in one interpreter (each start imports torch: seconds), checked in this order:
# it prints the name of the first one missing, or nothing; an interpreter that dies before it says counts
# as torch's failure.
missing="$(PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}" "$python" -c '
import sys

checks = [("torch", "import torch, lightning"), ("vlm_lab", "import vlm_lab"), ("open_clip", "import open_clip")]
if sys.argv[1] == "0":
    checks.append(("cuda", "if not torch.cuda.is_available(): raise RuntimeError"))
for name, code in checks:
    try:
        exec(code)
    except Exception:
        print(name)
        break
' "$dry_run" 2>/dev/null)" || missing=torch
case "$missing" in
    torch) fail "torch and lightning do not import in $python" ;;
    vlm_lab) fail "vlm_lab does not import: run from a checkout with 'pip install -e \".[dev]\" -c constraints.txt'" ;;
    open_clip) fail "open_clip is not installed (the throughput and LiT rows compare with it): pip install -e \".[bench]\" -c constraints.txt" ;;
    cuda) fail "no CUDA device (torch.cuda.is_available() is False); --dry-run rehearses every row on the CPU" ;;
esac

exec "$python" "$here/gpu_check.py" "$@"
