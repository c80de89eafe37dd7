"""The ``vlm-lab`` command.

    vlm-lab fit CONFIG... [--run-dir DIR] [--resume] [key=value ...]   (CONFIG: a YAML file or a
                                                                       packaged experiment: quickstart)
    vlm-lab validate|test CONFIG... [ckpt_path=CKPT] [--run-dir DIR] [key=value ...]
    vlm-lab check CONFIG... [key=value ...]
    vlm-lab eval CONFIG... [ckpt_path=CKPT] [--run-dir DIR] [key=value ...]   (the eval section's evaluators)
    vlm-lab list [PATTERN] [--kind KIND]
    vlm-lab describe NAME
    vlm-lab config-reference [SECTION] [--markdown]
    vlm-lab export --ckpt CKPT --format hf|open_clip --out DIR
    vlm-lab checkpoint show CKPT | upgrade OLD NEW
    vlm-lab consolidate CKPT_DIR --out CKPT   (a sharded checkpoint of trainer.strategy=fsdp2 as one file)
    vlm-lab data convert (--ann FILE --images DIR | --hf PATH) --out DIR [--to shards|parquet|imagefolder|coco]
    vlm-lab data inspect CONFIG... [key=value ...] [--split SPLIT] [--grid PNG]
    vlm-lab sweep FILE --out DIR [--dry-run] [--max-parallel N] [--gpus auto|none|0,1,..] [--devices-per-run N]
                                 [--launcher local|slurm]
    vlm-lab sweep-report DIR

User errors print one line and exit with status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Sequence

from vlm_lab.errors import ConfigError

EXIT_USER_ERROR = 2
EXIT_FAILURE = 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    # Overrides may follow options (`fit a.yaml --run-dir d key=value`): collect them from the rest.
    args, rest = parser.parse_known_args(argv)
    unknown = [r for r in rest if r.startswith("-") or not hasattr(args, "items")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if rest:
        args.items += rest
    try:
        return args.handler(args)
    except ConfigError as e:
        if args.debug:
            raise
        print(f"vlm-lab: error: {_user_error_line(e)}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("vlm-lab: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # a bug or a library failure: one line unless --debug
        if args.debug:
            raise
        first_line = (str(e).strip().splitlines() or [""])[0]
        print(f"vlm-lab: error: {type(e).__name__}: {first_line} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return EXIT_FAILURE


def command_line(*args: str) -> list[str]:
    """``vlm-lab ARGS`` as an argv for ``subprocess``. This interpreter runs the module, so it works
    from a virtual environment that is not activated and needs no console script on PATH."""
    return [sys.executable, "-m", "vlm_lab.cli", *args]


def run_logged(args: Sequence[str], log_file: Path, cwd: Path | None = None) -> int:
    """Run ``vlm-lab ARGS`` in a fresh process with its output (stdout and stderr) in ``log_file``,
    and return its exit status. Scripts that chain commands (experiments' studies) use it, so each
    step is the command a user would type and its log survives the step."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w") as log:
        return subprocess.call(command_line(*args), cwd=cwd, stdout=log, stderr=subprocess.STDOUT)


def _user_error_line(error: ConfigError) -> str:
    """A user error's one line. One raised in a DataLoader worker (a shard's schema error) reaches the
    main process re-raised with the worker's traceback in its message: keep the original line."""
    text = str(error).strip()
    if "Original Traceback" in text:
        return text.splitlines()[-1].split("ConfigError: ", 1)[-1]
    return text


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlm-lab", description="Train and evaluate vision-language models.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    commands = parser.add_subparsers(dest="command", required=True)

    for stage, text in [("fit", "train a model"), ("validate", "evaluate on the validation split"),
                        ("test", "evaluate on the test split"),
                        ("check", "check a config: build the model and the data, train nothing"),
                        ("eval", "run the evaluators of the config's eval section (zero-shot, retrieval, probes)")]:
        sub = commands.add_parser(stage, help=text, description=text)
        sub.add_argument("items", nargs="+", metavar="CONFIG|key=value",
                         help="YAML files (or packaged experiments by name, e.g. quickstart) merged "
                              "left to right, then dotlist overrides")
        sub.add_argument("--run-dir", help="run directory (default: runs/<name>/<timestamp>)")
        if stage == "fit":
            sub.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoints/last.ckpt")
        sub.add_argument("--allow-import-paths", action="store_true",
                         help="let spec names be 'package.module:Attribute' import paths (off by default)")
        _add_debug(sub)
        sub.set_defaults(handler=_run_stage, stage=stage)

    sub = commands.add_parser("list", help="list registered names, catalog cards (with their folder) and "
                                           "packaged experiments")
    sub.add_argument("pattern", nargs="?", default="*", help="wildcard, e.g. 'clip_*'")
    sub.add_argument("--kind", help="only this kind (vision_tower, text_tower, head, loss, datamodule, logger, "
                                    "callback, or experiment: the packaged experiments)")
    _add_debug(sub)
    sub.set_defaults(handler=_list)

    sub = commands.add_parser("sweep", help="run every unfinished run of a sweep file")
    sub.add_argument("file", help="sweep YAML (base, overrides, grid, runs, search, repeats...)")
    sub.add_argument("--out", required=True, help="sweep directory: one sub-directory per run")
    sub.add_argument("--dry-run", action="store_true", help="list the runs and their commands only")
    sub.add_argument("--max-parallel", type=int, default=1, help="local runs at a time")
    sub.add_argument("--gpus", help="GPUs for local runs: auto (every visible one), none, or ids such as 0,1,2,3; "
                                    "concurrent runs never share one (default: the sweep file's gpus, else auto)")
    sub.add_argument("--devices-per-run", type=int, help="GPUs each local run gets (default: the sweep file's, else the GPUs "
                                                              "shared evenly between the --max-parallel runs)")
    sub.add_argument("--launcher", choices=("local", "slurm"), default="local")
    sub.add_argument("--slurm-cluster", help="submitit cluster (default: detected; 'local' for a dry run of SLURM)")
    _add_debug(sub)
    sub.set_defaults(handler=_sweep)

    sub = commands.add_parser("sweep-report", help="write results.csv, results.md and plots of a sweep")
    sub.add_argument("out", help="sweep directory")
    sub.add_argument("--metric", help="metric to plot (default: the sweep file's metric, else every R@1)")
    _add_debug(sub)
    sub.set_defaults(handler=_sweep_report)

    sub = commands.add_parser("export", help="write a checkpoint as a Hugging Face or open_clip model directory")
    sub.add_argument("--ckpt", required=True, help="a checkpoint of vlm-lab fit (e.g. RUN_DIR/checkpoints/last.ckpt)")
    sub.add_argument("--format", required=True, choices=("hf", "open_clip"),
                     help="hf: CLIPModel or VisionTextDualEncoderModel (timm towers as TimmWrapperModel); "
                          "open_clip: config + safetensors (docs/how-to/export.md)")
    sub.add_argument("--out", required=True, help="new (or empty) output directory")
    _add_debug(sub)
    sub.set_defaults(handler=_export)

    sub = commands.add_parser("checkpoint", help="inspect a checkpoint, or convert one written before they were "
                                                 "self-contained")
    actions = sub.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="format, weights, tokenizer files and model section of a checkpoint")
    show.add_argument("ckpt")
    _add_debug(show)
    show.set_defaults(handler=_checkpoint_show)
    upgrade = actions.add_parser("upgrade", help="rewrite an old checkpoint as a self-contained one (run it where "
                                                 "the files its config names exist)")
    upgrade.add_argument("old", help="a checkpoint written by vlm-lab up to commit e956f06")
    upgrade.add_argument("new", help="the self-contained checkpoint to write (a new file)")
    _add_debug(upgrade)
    upgrade.set_defaults(handler=_checkpoint_upgrade)
    sub = commands.add_parser("consolidate", help="write a sharded checkpoint directory (trainer.strategy: "
                                                  "{name: fsdp2, checkpoint: sharded}) as one checkpoint file")
    sub.add_argument("ckpt", help="the checkpoint directory, e.g. RUN_DIR/checkpoints/last.ckpt")
    sub.add_argument("--out", required=True, help="the new checkpoint file")
    _add_debug(sub)
    sub.set_defaults(handler=_consolidate)

    sub = commands.add_parser("caption", help="caption images with a CoCa checkpoint (one line per image)")
    sub.add_argument("images", nargs="+", metavar="IMAGE")
    sub.add_argument("--ckpt", required=True, help="a checkpoint of vlm-lab fit trained with model.caption_weight > 0")
    sub.add_argument("--num-beams", type=int, help="beam search with this many beams (default: greedy)")
    sub.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    sub.add_argument("--temperature", type=float)
    sub.add_argument("--top-k", type=int)
    sub.add_argument("--top-p", type=float)
    sub.add_argument("--repetition-penalty", type=float)
    sub.add_argument("--no-repeat-ngram-size", type=int, help="no n-gram of this many tokens twice in a caption")
    sub.add_argument("--length-penalty", type=float)
    sub.add_argument("--min-new-tokens", type=int)
    sub.add_argument("--max-new-tokens", type=int)
    sub.add_argument("--seed", type=int, help="seed of the sampler")
    sub.add_argument("--no-cache", action="store_true", help="recompute the whole prefix each step (slow; a reference)")
    _add_debug(sub)
    sub.set_defaults(handler=_caption)

    sub = commands.add_parser("config-reference", help="every config key with its type, default and help")
    sub.add_argument("section", nargs="?", help="only this section, e.g. optim, model.generation, data")
    sub.add_argument("--markdown", action="store_true", help="Markdown tables (docs/reference/config.md)")
    _add_debug(sub)
    sub.set_defaults(handler=_config_reference)

    sub = commands.add_parser("describe", help="show a name's signature, documentation and source")
    sub.add_argument("name")
    _add_debug(sub)
    sub.set_defaults(handler=_describe)

    from vlm_lab.data.commands import add_data_commands  # light: the heavy imports wait for the handlers

    add_data_commands(commands, _add_debug)
    return parser


def _add_debug(subparser: argparse.ArgumentParser) -> None:
    # SUPPRESS: a subcommand without --debug must not reset `vlm-lab --debug fit ...` to False.
    subparser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                           help="show full tracebacks")


def _run_stage(args: argparse.Namespace) -> int:
    # An existing .yaml file is a config even with '=' in its path (sweep runs live in 'lr=0.001/').
    is_file = [("=" not in i) or (i.endswith((".yaml", ".yml")) and Path(i).is_file()) for i in args.items]
    files = [i for i, f in zip(args.items, is_file) if f]
    overrides = [i for i, f in zip(args.items, is_file) if not f]
    ckpt_path = None
    for item in list(overrides):
        if item.startswith("ckpt_path="):
            if args.stage == "fit":
                raise ConfigError("ckpt_path= is for validate and test; use --resume to continue a fit")
            ckpt_path = item.split("=", 1)[1]
            overrides.remove(item)
    if not files:
        raise ConfigError("give at least one config file or packaged experiment, e.g. quickstart "
                          "(vlm-lab list --kind experiment)")
    if ckpt_path is not None:
        # The checkpoint holds the whole model, so the config's model.init_from (a folder that may not
        # exist on this machine) is not read; its model section only sets decoding (model.generation).
        overrides.append("model.init_from=null")

    import vlm_lab  # heavy imports only once the arguments are known to be sane
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    from vlm_lab.api import format_retrieval_table

    cfg = vlm_lab.load_config(*files, overrides=overrides, allow_import_paths=args.allow_import_paths)
    if args.stage == "check":
        module = vlm_lab.build_module(cfg)
        datamodule = vlm_lab.build_datamodule(cfg, module)
        datamodule.setup("fit")
        with tempfile.TemporaryDirectory() as scratch:  # some loggers (MLflow) create their store when built
            vlm_lab.build_trainer(cfg, scratch)  # checks the trainer arguments and builds the loggers
        parameters = sum(p.numel() for p in module.parameters())
        print(f"config OK: {cfg.name} builds a {parameters / 1e6:.2f}M-parameter model "
              f"({cfg.model.vision.name} + {cfg.model.text.name}, {cfg.model.loss.name} loss) "
              f"and the {cfg.data.name} data module")
        return 0
    if args.stage == "eval":
        from vlm_lab.eval.suite import format_eval_table

        metrics = vlm_lab.api.evaluate(cfg, ckpt_path=ckpt_path, run_dir=args.run_dir)
        if rank_zero_only.rank == 0:
            print()
            print(format_eval_table(metrics))
        return 0
    if args.stage == "fit":
        metrics = vlm_lab.fit(cfg, run_dir=args.run_dir, resume=args.resume)
        stage = "val"
    else:
        metrics = getattr(vlm_lab, args.stage)(cfg, ckpt_path=ckpt_path, run_dir=args.run_dir)
        stage = "val" if args.stage == "validate" else "test"
    if rank_zero_only.rank == 0:  # every process of a multi-process run gets here; one table is enough
        print()
        print(format_retrieval_table(metrics, stage))
    return 0


def _list(args: argparse.Namespace) -> int:
    import fnmatch

    from vlm_lab import registry, shipped

    if args.kind == "experiment":
        kinds = []
    else:
        kinds = [args.kind] if args.kind else list(registry.KINDS)
    for kind in kinds:
        matches = registry.list_names(kind, args.pattern)
        if not matches:
            continue
        cards = registry.cards(kind)
        rows = []
        for name in matches:
            card = cards.get(name)
            what = f"card -> {card.builds}" if card else "code"
            origin = card.catalog.label if card else ""  # built-in, or the user's catalog folder
            rows.append((name, what, origin, card.description.splitlines()[0] if card and card.description else ""))
        _print_rows(kind, rows)
    if args.kind in (None, "experiment"):
        # The packaged experiments: `vlm-lab fit NAME` runs one; copy its file to change it.
        rows = [(name, str(path)) for name, path in shipped.experiments().items()
                if fnmatch.fnmatchcase(name, args.pattern)]
        if rows:
            _print_rows("experiment", rows)
    return 0


def _print_rows(heading: str, rows: list[tuple[str, ...]]) -> None:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    print(f"{heading}:")
    for row in rows:
        cells = [f"{cell:<{width}}" for cell, width in zip(row, widths)] + [row[-1]]
        print(("  " + "  ".join(cells)).rstrip())


def _sweep(args: argparse.Namespace) -> int:
    from vlm_lab import sweep

    outcomes = sweep.run(args.file, args.out, dry_run=args.dry_run, max_parallel=args.max_parallel,
                         launcher=args.launcher, slurm_cluster=args.slurm_cluster, gpus=args.gpus,
                         devices_per_run=args.devices_per_run)
    failed = [o for o in outcomes if o.status == "failed"]
    pruned = sum(o.status == "pruned" for o in outcomes)
    preempted = sum(o.status == "preempted" for o in outcomes)  # a SLURM requeue finishes them
    if not args.dry_run:
        for o in outcomes:
            print(f"{o.status:>8}  {o.name}" + (f"  ({o.error})" if o.error else ""))
        print(f"{len(outcomes)} runs: {sum(o.status == 'done' for o in outcomes)} done, "
              f"{sum(o.status == 'skipped' for o in outcomes)} skipped (finished before), "
              + (f"{pruned} pruned, " if pruned else "") + (f"{preempted} preempted, " if preempted else "")
              + f"{len(failed)} failed; "
              f"results in {Path(args.out) / 'results.md'}")
    return min(len(failed), 100)  # the exit status counts the failed runs


def _sweep_report(args: argparse.Namespace) -> int:
    from vlm_lab import sweep

    for path in sweep.report(args.out, metric=args.metric):
        print(path)
    return 0


def _export(args: argparse.Namespace) -> int:
    from vlm_lab.interop import export

    out = export(args.ckpt, args.format, args.out)
    print(f"wrote {args.format} model to {out}")
    return 0


def _consolidate(args: argparse.Namespace) -> int:
    from vlm_lab.sharding import consolidate_checkpoint

    print(f"wrote {consolidate_checkpoint(args.ckpt, args.out)}")
    return 0


def _checkpoint_show(args: argparse.Namespace) -> int:
    from vlm_lab.checkpoint_format import describe_checkpoint

    print(describe_checkpoint(args.ckpt))
    return 0


def _checkpoint_upgrade(args: argparse.Namespace) -> int:
    from vlm_lab.api import upgrade_checkpoint

    print(f"wrote the self-contained checkpoint {upgrade_checkpoint(args.old, args.new)}")
    return 0


def _caption(args: argparse.Namespace) -> int:
    from vlm_lab.api import caption_images

    options = {"num_beams": args.num_beams, "temperature": args.temperature, "top_k": args.top_k,
               "top_p": args.top_p, "repetition_penalty": args.repetition_penalty,
               "no_repeat_ngram_size": args.no_repeat_ngram_size,
               "length_penalty": args.length_penalty, "min_new_tokens": args.min_new_tokens,
               "max_new_tokens": args.max_new_tokens, "seed": args.seed,
               "do_sample": args.sample or None, "use_cache": False if args.no_cache else None}
    changes = {key: value for key, value in options.items() if value is not None}  # unset: the checkpoint's
    for path, caption in zip(args.images, caption_images(args.ckpt, args.images, changes)):
        print(f"{path}\t{caption}")
    return 0


def _config_reference(args: argparse.Namespace) -> int:
    from vlm_lab.config import reference_markdown, reference_text

    if args.markdown and args.section:
        raise ConfigError("config-reference: --markdown renders every section; leave out SECTION")
    print(reference_markdown() if args.markdown else reference_text(args.section))
    return 0


def _describe(args: argparse.Namespace) -> int:
    from vlm_lab import registry

    registry.describe(args.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
