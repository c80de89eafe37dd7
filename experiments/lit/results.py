"""Run the LiT variants on Flickr8k and write their results table (markdown, optionally into this folder's README.md).

    python experiments/lit/results.py                           # every variant, as configured
    python experiments/lit/results.py --only locked_both_floor locked_image_pretrained_text
    python experiments/lit/results.py --table-only --readme     # rebuild the table from finished runs
    python experiments/lit/results.py --plot                    # redraw docs/figures/lit_ablation.png from it

Each variant is ``vlm-lab fit experiments/lit/flickr8k_lit.yaml experiments/lit/<variant>.yaml`` in
``--out/<variant>`` (a finished run, marked ``DONE``, is not run again). The table has validation
R@1/5/10 in both directions, zero-shot CIFAR-10 top-1 (on the images the config's ``eval.evaluators.cifar10``
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
# The results live beside the experiment: experiments/lit/README.md (the docs site includes it).
RESULTS_PAGE = HERE / "README.md"
FIGURE = ROOT / "docs" / "figures" / "lit_ablation.png"


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
                  "eval/cifar10/top1")]
        status = "" if (out / stem / "DONE").is_file() else " (unfinished)"
        lines.append(f"| {paper}: {what}{status} | `{stem}` | " + " | ".join(cells)
                     + f" | {int(m.get('epoch', -1)) + 1} | {wall} |")
    return "\n".join(lines)


def write_readme(text: str, page: Path = RESULTS_PAGE) -> None:
    """Replace the table between the START and END markers of ``page`` with ``text``."""
    content = page.read_text()
    if START not in content or END not in content:
        raise SystemExit(f"{page} has no {START} ... {END} block to fill")
    block = f"{START}\n{text}\n{END}"
    page.write_text(re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, content, flags=re.S))


def read_table(page: Path = RESULTS_PAGE) -> list[dict[str, str]]:
    """The rows of the results table between the markers of ``page``, as {column: cell}."""
    content = page.read_text()
    match = re.search(re.escape(START) + "(.*?)" + re.escape(END), content, flags=re.S)
    if match is None:
        raise SystemExit(f"{page} has no {START} ... {END} block to read")
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in match.group(1).strip().splitlines()]
    header, body = rows[0], [r for r in rows[2:] if len(r) == len(rows[0])]
    return [dict(zip(header, row)) for row in body]


def plot(rows: list[dict[str, str]], out: Path = FIGURE) -> Path:
    """A bar chart of i2t / t2i R@1 and zero-shot top-1 per variant, from the table's numbers."""
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    metrics = [("i2t R@1", "image-to-text R@1"), ("t2i R@1", "text-to-image R@1"),
               ("CIFAR-10 zero-shot top-1", "zero-shot CIFAR-10 top-1")]
    names = [row["variant"].split(":")[0] for row in rows]
    fig, ax = plt.subplots(figsize=(7.5, 3.6), dpi=110)
    width = 0.8 / len(metrics)
    for i, (column, label) in enumerate(metrics):
        values = [float(row[column]) if row[column] not in ("-", "") else 0.0 for row in rows]
        positions = [x + (i - (len(metrics) - 1) / 2) * width for x in range(len(rows))]
        bars = ax.bar(positions, values, width, label=label)
        ax.bar_label(bars, fmt="%.1f", fontsize=7, padding=1)
    ax.set_xticks(range(len(rows)), names)
    ax.set_ylabel("% on Flickr8k val / CIFAR-10")
    ax.set_title("LiT variants on Flickr8k (image tower first; L locked, U tuned, u from scratch)", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "runs" / "lit"), help="one sub-folder per variant")
    parser.add_argument("--only", nargs="*", help="variant file stems to run (default: all)")
    parser.add_argument("--table-only", action="store_true", help="run nothing, rebuild the table")
    parser.add_argument("--readme", action="store_true", help="write the table into experiments/lit/README.md")
    parser.add_argument("--plot", action="store_true",
                        help="run nothing; draw docs/figures/lit_ablation.png from the table in experiments/lit/README.md")
    args, overrides = parser.parse_known_args()
    if args.plot:
        print(plot(read_table()))
        return
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
