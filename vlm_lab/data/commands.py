"""The ``vlm-lab data`` commands (``vlm_lab/cli.py`` adds them to the parser).

    vlm-lab data convert (--ann FILE --images DIR | --hf PATH [--split NAME]) --out DIR
                         [--to shards|parquet|imagefolder|coco] [--per caption|image] [--shard-size N]
    vlm-lab data inspect CONFIG... [key=value ...] [--split train|val|test] [--samples N] [--limit N] [--grid PNG]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from vlm_lab.errors import ConfigError


def add_data_commands(commands: argparse._SubParsersAction,
                      add_debug: Callable[[argparse.ArgumentParser], None]) -> None:
    """Add ``data convert`` and ``data inspect`` to the ``vlm-lab`` sub-commands."""
    data = commands.add_parser("data", help="convert datasets between layouts, inspect a config's data")
    actions = data.add_subparsers(dest="data_command", required=True)

    sub = actions.add_parser("convert", help="move a captions dataset between COCO, img2dataset shards and datasets")
    read = sub.add_argument_group("what to read: a COCO captions file, or a datasets dataset")
    read.add_argument("--ann", help="COCO captions JSON (images + annotations)")
    read.add_argument("--images", help="the folder its file_names are in")
    read.add_argument("--hf", metavar="PATH", help="a datasets dataset: a local folder (save_to_disk, Parquet, "
                                                   "Arrow, imagefolder) or a hub id (online)")
    read.add_argument("--hf-format", default="auto",
                      choices=("auto", "saved", "parquet", "arrow", "imagefolder", "hub"), help="(default: auto)")
    read.add_argument("--image-column", default="image", help="--hf: the image column (default image)")
    read.add_argument("--caption-column", default="caption", help="--hf: the caption column (default caption)")
    sub.add_argument("--split", help="--hf: the split to read; --to parquet/imagefolder/coco: the split name "
                                     "written (default train)")
    sub.add_argument("--out", required=True, help="output folder")
    sub.add_argument("--to", choices=("shards", "parquet", "imagefolder", "coco"), default="shards",
                     help="shards (img2dataset's NNNNN.tar + NNNNN_stats.json, the default), parquet or "
                          "imagefolder (datasets layouts), or coco")
    sub.add_argument("--per", choices=("caption", "image"),
                     help="one sample per caption, or per image with all its captions (default: caption for "
                          "shards, image otherwise)")
    sub.add_argument("--shard-size", type=int, default=10000, help="samples per shard or Parquet file (default 10000)")
    add_debug(sub)
    sub.set_defaults(handler=_convert)

    sub = actions.add_parser("inspect", help="counts, samples, caption lengths and an image grid of a config's data")
    sub.add_argument("items", nargs="+", metavar="CONFIG|key=value",
                     help="YAML files merged left to right, then dotlist overrides")
    sub.add_argument("--split", choices=("train", "val", "test"), default="train")
    sub.add_argument("--samples", type=int, default=8, help="samples to print and draw (default 8)")
    sub.add_argument("--limit", type=int, default=2000,
                     help="images read for the caption statistics (default 2000)")
    sub.add_argument("--grid", help="PNG to save the grid to (default: runs/<name>/inspect_<split>.png)")
    add_debug(sub)
    sub.set_defaults(handler=_inspect)


def _convert(args: argparse.Namespace) -> int:
    from vlm_lab.data.convert import convert

    print(convert(args.out, args.to, ann=args.ann, images_dir=args.images, hf=args.hf, split=args.split,
                  image_column=args.image_column, caption_column=args.caption_column, hf_format=args.hf_format,
                  per=args.per, shard_size=args.shard_size))
    return 0


def _inspect(args: argparse.Namespace) -> int:
    files = [i for i in args.items if "=" not in i]
    overrides = [i for i in args.items if "=" in i]
    if not files:
        raise ConfigError("give at least one config file, e.g. experiments/flickr8k.yaml")
    if args.samples < 1 or args.limit < 1:
        raise ConfigError("--samples and --limit must be at least 1")

    import vlm_lab
    from vlm_lab.data.inspection import inspect_split

    cfg = vlm_lab.load_config(*files, overrides=overrides)
    module = vlm_lab.build_module(cfg)  # the tokenizer and the tower's image preprocessing
    datamodule = vlm_lab.build_datamodule(cfg, module)
    grid = args.grid or str(Path("runs") / (cfg.name or "run") / f"inspect_{args.split}.png")
    print(f"{cfg.data.name} ({', '.join(files)})")
    print(inspect_split(datamodule, args.split, samples=args.samples, limit=args.limit, grid=grid))
    return 0
