"""Choose the CoCa recipe's decoding on the dev split: score one checkpoint under several decodings.

    python experiments/coca/decoding_search.py --ckpt runs/coca_flickr8k/checkpoints/best.ckpt
    python experiments/coca/decoding_search.py --ckpt CKPT --try num_beams=5,length_penalty=0.5
    python experiments/coca/decoding_search.py --ckpt CKPT --table-only

Each decoding is ``vlm-lab validate experiments/coca_flickr8k.yaml experiments/coca/dev_split.yaml
ckpt_path=CKPT model.generation.<key>=<value>...`` in ``--out/<key>=<value>,...``: the 500 dev images
(never Flickr8k val) captioned and scored with BLEU-4 and CIDEr against their five references. The
grid moves one setting at a time away from where the search started (``START``: the recipe's decoding
before it, 5 beams, length penalty 1, n-grams free to repeat), then combines the best number of beams
with each n-gram ban; ``--try`` adds more. Every decoding is spelt out in full on the command line
(``START`` with the entry on top), so the scores do not depend on what the recipe file says today. A
decoding already scored is not run again. The table (markdown, best dev CIDEr first) goes to stdout;
the choice and the val figure are in experiments/coca_flickr8k.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from vlm_lab.cli import run_logged

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
RECIPE = ROOT / "experiments" / "coca_flickr8k.yaml"
DEV_SPLIT = HERE / "dev_split.yaml"
START = {"num_beams": 5, "length_penalty": 1.0, "no_repeat_ngram_size": 0}
GRID = [
    "num_beams=3", "num_beams=5", "num_beams=8",                 # num_beams=5 is START itself
    "length_penalty=0.5", "length_penalty=1.5",
    "no_repeat_ngram_size=2", "no_repeat_ngram_size=3",
    "num_beams=3,no_repeat_ngram_size=2", "num_beams=3,no_repeat_ngram_size=3",   # the best beams x each ban
]


def settings_of(name: str) -> dict[str, str]:
    """``START`` with the entry ``name`` ("key=value,key=value") on top."""
    pairs = name.split(",")
    if not all("=" in pair for pair in pairs):
        raise SystemExit(f"decoding_search: {name!r} is not key=value[,key=value] (keys: {', '.join(START)})")
    changes = dict(pair.split("=", 1) for pair in pairs)
    unknown = sorted(set(changes) - set(START))
    if unknown:
        raise SystemExit(f"decoding_search: {name!r} sets {', '.join(unknown)}; the search varies {', '.join(START)}")
    return {**{key: str(value) for key, value in START.items()}, **changes}


def score(name: str, ckpt: Path, out: Path) -> dict[str, float] | None:
    """Dev metrics of ``ckpt`` decoded with the settings ``name`` ("key=value,key=value")."""
    run_dir = out / name
    if not (run_dir / "metrics.json").is_file():
        settings = [f"model.generation.{key}={value}" for key, value in settings_of(name).items()]
        code = run_logged(["validate", str(RECIPE), str(DEV_SPLIT), f"ckpt_path={ckpt}", *settings,
                           "--run-dir", str(run_dir)], out / f"{name}.log", cwd=ROOT)
        if code != 0:
            print(f"{name}: vlm-lab validate exited {code}, see {out / f'{name}.log'}", file=sys.stderr)
            return None
    return json.loads((run_dir / "metrics.json").read_text())


def table(rows: dict[str, dict[str, float]]) -> str:
    lines = ["| decoding (model.generation, on top of START) | dev BLEU-4 | dev CIDEr |", "|---|---|---|"]
    for name, metrics in sorted(rows.items(), key=lambda item: -item[1]["val/cider"]):
        label = f"{name} (the start)" if settings_of(name) == settings_of("num_beams=5") else name
        lines.append(f"| {label} | {100 * metrics['val/bleu4']:.2f} | {metrics['val/cider']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", type=Path, required=True, help="the checkpoint to caption with (best on dev)")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "coca_decoding")
    parser.add_argument("--try", dest="extra", action="append", default=[], metavar="KEY=VALUE[,KEY=VALUE]",
                        help="another decoding to score besides the grid (keys: those of START)")
    parser.add_argument("--table-only", action="store_true", help="only tabulate the decodings already scored")
    args = parser.parse_args(argv)
    if not args.ckpt.is_file():
        print(f"decoding_search: --ckpt {args.ckpt} is not a file", file=sys.stderr)
        return 2
    for name in args.extra:
        settings_of(name)  # a misspelt key stops the search before anything runs
    rows = {}
    for name in [*GRID, *args.extra]:
        if args.table_only and not (args.out / name / "metrics.json").is_file():
            continue
        metrics = score(name, args.ckpt, args.out)
        if metrics is not None:
            rows[name] = metrics
    print(table(rows))
    return 0 if len(rows) == len(GRID) + len(args.extra) or args.table_only else 1


if __name__ == "__main__":
    sys.exit(main())
