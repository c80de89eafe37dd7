"""Run the LiT variants on Flickr8k and write their results table (markdown, optionally into this folder's README.md).

    python experiments/lit/results.py                           # every variant, as configured
    python experiments/lit/results.py --only locked_both_floor locked_image_pretrained_text
    python experiments/lit/results.py --table-only --readme     # rebuild the table from finished runs
    python experiments/lit/results.py --plot                    # redraw docs/figures/lit_ablation.png from it

Each variant is trained as the recipe is chosen (issue 25): ``vlm-lab fit experiments/lit/flickr8k_lit.yaml
experiments/lit/dev_split.yaml experiments/lit/<variant>.yaml`` in ``--out/<variant>``, validated on the
500-image dev split and keeping its best dev checkpoint; that checkpoint is then scored once on Flickr8k
val (``vlm-lab validate``, in ``<variant>/val``) and zero-shot on CIFAR-10 (``vlm-lab eval``, in
``<variant>/cifar10``, on the images the config's ``eval.evaluators.cifar10`` section names). A step whose
results exist is not run again (a fit the sweep experiments/sweeps/lit_ablation.yaml finished included).
The table has val R@1/5/10 in both directions, zero-shot CIFAR-10 top-1, the epoch kept of those trained
and the training's wall-clock time. Extra ``key=value`` arguments go to every command.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

from vlm_lab.cli import run_logged

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
HEADLINE = HERE / "flickr8k_lit.yaml"
DEV_SPLIT = HERE / "dev_split.yaml"  # validation on dev, the best dev checkpoint kept, no zero-shot in training
VAL, ZERO_SHOT = "val", "cifar10"  # a run's sub-folders: its kept checkpoint scored on val, and zero-shot
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
    """Fit ``stem`` on the dev split, then score its best dev checkpoint on val and zero-shot CIFAR-10."""
    run_dir = out / stem
    variant = str(HERE / f"{stem}.yaml")
    if not (run_dir / "DONE").is_file():
        start = time.perf_counter()
        code = run_logged(["fit", str(HEADLINE), str(DEV_SPLIT), variant, "--run-dir", str(run_dir), *overrides],
                          run_dir / "log.txt", cwd=ROOT)
        seconds = time.perf_counter() - start
        (run_dir / "wall_seconds").write_text(f"{seconds:.0f}\n")
        print(f"{stem}: fit exit {code} after {seconds / 60:.1f} min", flush=True)
        if code != 0:
            return
        (run_dir / "DONE").write_text("")
    best = f"ckpt_path={run_dir / 'checkpoints' / 'best.ckpt'}"
    for command, folder in (("validate", VAL), ("eval", ZERO_SHOT)):
        if not (run_dir / folder / "metrics.json").is_file():
            # Scored without the dev overlay: val is Flickr8k val, and CIFAR-10 as the recipe configures it.
            code = run_logged([command, str(HEADLINE), variant, best, "--run-dir", str(run_dir / folder),
                               *overrides], run_dir / f"{folder}.log", cwd=ROOT)
            print(f"{stem}: {command} exit {code}", flush=True)


def kept_epoch(run_dir: Path) -> str:
    """The epoch (counted from 1) of the best dev checkpoint, of the epochs trained: "2 / 3"."""
    import torch

    trained = json.loads((run_dir / "metrics.json").read_text())["epoch"] + 1
    best = run_dir / "checkpoints" / "best.ckpt"
    kept = torch.load(best, map_location="cpu", mmap=True, weights_only=False)["epoch"] + 1 if best.is_file() else "?"
    return f"{kept} / {trained}"


def table(out: Path) -> str:
    """The results of the variants in ``out`` that have been scored on val, one row each."""
    lines = ["| variant | config | i2t R@1 | i2t R@5 | i2t R@10 | t2i R@1 | t2i R@5 | t2i R@10 | CIFAR-10 zero-shot top-1 "
             "| epoch kept / trained | wall |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for stem, paper, what in VARIANTS:
        run_dir = out / stem
        if not (run_dir / VAL / "metrics.json").is_file():
            continue
        m = json.loads((run_dir / VAL / "metrics.json").read_text())
        zero_shot = run_dir / ZERO_SHOT / "metrics.json"
        m.update(json.loads(zero_shot.read_text()) if zero_shot.is_file() else {})
        wall_file = run_dir / "wall_seconds"
        wall = f"{float(wall_file.read_text()) / 60:.0f} min" if wall_file.is_file() else "?"
        cells = [f"{m[k]:.1f}" if k in m else "-" for k in
                 ("val/i2t_R@1", "val/i2t_R@5", "val/i2t_R@10", "val/t2i_R@1", "val/t2i_R@5", "val/t2i_R@10",
                  "eval/cifar10/top1")]
        lines.append(f"| {paper}: {what} | `{stem}` | " + " | ".join(cells) + f" | {kept_epoch(run_dir)} | {wall} |")
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
