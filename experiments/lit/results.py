"""Run the LiT variants on Flickr8k and write their results table (markdown, optionally into README.md).

    python experiments/lit/results.py                           # every variant, as configured
    python experiments/lit/results.py --only locked_both_floor locked_image_pretrained_text
    python experiments/lit/results.py --table-only --readme     # rebuild the table from finished runs

Each variant is ``vlm-lab fit experiments/lit/flickr8k_lit.yaml experiments/lit/<variant>.yaml`` in
``--out/<variant>`` (a finished run, marked ``DONE``, is not run again). The table has validation
R@1/5/10 in both directions, zero-shot CIFAR-10 top-1 (on the images the config's ``zeroshot``
section names), epochs and wall-clock time. Extra ``key=value`` arguments go to every run.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HEADLINE = HERE / "flickr8k_lit.yaml"
# (file stem, the LiT paper's name, what it is)
VARIANTS = [
    ("locked_both_floor", "LL", "both towers locked, projections only (the floor)"),
    ("locked_image_scratch_text", "Lu", "locked image, text from scratch"),
    ("locked_image_pretrained_text", "LU", "locked image, pretrained MiniLM tuned (headline)"),
    ("tuned_image_scratch_text", "Uu", "pretrained image tuned, text from scratch"),
    ("tuned_image_tuned_text", "UU", "both pretrained, both tuned"),
    ("scratch_both", "uu", "both from scratch"),
]
START, END = "<!-- lit-results:start -->", "<!-- lit-results:end -->"


def run(stem: str, out: Path, overrides: list[str]) -> None:
    run_dir = out / stem
    if (run_dir / "DONE").is_file():
        return
    command = [sys.executable, "-m", "vlm_lab.cli", "fit", str(HEADLINE), str(HERE / f"{stem}.yaml"),
               "--run-dir", str(run_dir), *overrides]
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        code = subprocess.call(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    (run_dir / "wall_seconds").write_text(f"{seconds:.0f}\n")
    if code == 0:
        (run_dir / "DONE").write_text("")
    print(f"{stem}: exit {code} after {seconds / 60:.1f} min", flush=True)


def table(out: Path) -> str:
    lines = ["| variant | config | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | CIFAR-10 zero-shot top-1 | epochs | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stem, paper, what in VARIANTS:
        metrics_file = out / stem / "metrics.json"
        if not metrics_file.is_file():
            continue
        m = json.loads(metrics_file.read_text())
        wall_file = out / stem / "wall_seconds"
        wall = f"{float(wall_file.read_text()) / 60:.0f} min" if wall_file.is_file() else "?"
        cells = [f"{m[k]:.1f}" if k in m else "-" for k in
                 ("val/i2t_R@1", "val/i2t_R@5", "val/i2t_R@10", "val/t2i_R@1", "val/t2i_R@5", "val/t2i_R@10",
                  "val/zeroshot_top1")]
        status = "" if (out / stem / "DONE").is_file() else " (unfinished)"
        lines.append(f"| {paper}: {what}{status} | `{stem}` | " + " | ".join(cells)
                     + f" | {int(m.get('epoch', -1)) + 1} | {wall} |")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    readme = ROOT / "README.md"
    content = readme.read_text()
    if START not in content:
        raise SystemExit(f"README.md has no {START} ... {END} block to fill")
    block = f"{START}\n{text}\n{END}"
    readme.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, content, flags=re.S))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "lit"), help="one sub-folder per variant")
    parser.add_argument("--only", nargs="*", help="variant file stems to run (default: all)")
    parser.add_argument("--table-only", action="store_true", help="run nothing, rebuild the table")
    parser.add_argument("--readme", action="store_true", help="write the table into README.md")
    args, overrides = parser.parse_known_args()
    out = Path(args.out)
    if not args.table_only:
        for stem, _, _ in VARIANTS:
            if not args.only or stem in args.only:
                run(stem, out, overrides)
    text = table(out)
    print(text)
    if args.readme:
        write_readme(text)


if __name__ == "__main__":
    main()
