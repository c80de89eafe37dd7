"""The GPU check: what only a GPU can show, in one run and one table (``benchmarks/gpu_check.sh``).

    bash benchmarks/gpu_check.sh              # on a machine with a CUDA device: about 6 minutes
    bash benchmarks/gpu_check.sh --dry-run    # every row at toy sizes on the CPU: checks the script itself

Rows, each in a process of its own (so that one's GPU memory, process group or failure cannot touch
the next), with a time limit:

1. ``quickstart, bf16-mixed``: ``vlm-lab fit quickstart`` at ``trainer.precision=bf16-mixed`` on one
   GPU. Passes when the training loss falls (mean of the last three logged values below the first
   three) and validation R@1 is above chance in both directions.
2. ``quickstart, strategy fsdp2``: the same fit sharded (``trainer.strategy=fsdp2``, one process):
   the same two checks, and its fit time beside row 1's.
3. ``quickstart, model.compile``: the same fit with ``model.compile=true`` (its time includes
   compiling).
4. ``throughput vs open_clip``: ``benchmarks/vs_open_clip_throughput.py`` at batch 256 in bf16:
   samples/s of vlm-lab (Lightning) and open_clip on identical towers and weights, and the ratio.
5. ``LiT epoch vs open_clip``: ``benchmarks/vs_open_clip_lit_epoch.py``: one Flickr8k epoch with the
   embedding cache against open_clip's ``lock_image_tower()``; skipped with a note without Flickr8k.
6. ``peak memory, grad checkpointing``: ``benchmarks/checkpointing.py``: ViT-B/16 + base text tower,
   batch 128, bf16: CUDA's peak allocated memory without and with gradient checkpointing.

``--dry-run`` runs the same rows on the CPU at toy sizes (a few steps each); its figures measure
nothing, it proves the script works. Exit status: 0 when every row ran and passed (or was
skipped with a note), 1 otherwise; in a dry run, 0 when every row ran (toy fits need not learn).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from vlm_lab.cli import command_line

BENCHMARKS = Path(__file__).resolve().parent
ROOT = BENCHMARKS.parent
FLICKR = ROOT.parent / "shared" / "data" / "flickr8k"


@dataclass
class Row:
    name: str
    result: str
    verdict: str  # "ok", "FAIL: ...", "skip: ...", "ERROR: ..."
    seconds: float

    @property
    def passed(self) -> bool:
        return self.verdict == "ok" or self.verdict.startswith("skip")

    @property
    def ran(self) -> bool:
        return not self.verdict.startswith("ERROR")


class Check:
    """The rows, at GPU sizes or (``dry_run``) at toy sizes on the CPU."""

    def __init__(self, dry_run: bool, work: Path) -> None:
        self.dry_run, self.work = dry_run, work
        # Per-row time limits on a GPU; the dry run gets more, for a CPU shared with other jobs.
        self.slack = 3.0 if dry_run else 1.0
        self.device = "cpu" if dry_run else "cuda"
        self.fit_seconds: dict[str, float] = {}

    # ----------------------------------------------------------------------------------------------
    # Running one row

    def run(self, name: str, command: list[str], timeout: float) -> tuple[subprocess.CompletedProcess | None, float]:
        timeout *= self.slack
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        start = time.perf_counter()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, time.perf_counter() - start
        return done, time.perf_counter() - start

    def failure(self, done: subprocess.CompletedProcess | None, timeout: float) -> str | None:
        if done is None:
            return f"ERROR: over its {timeout * self.slack:.0f} s limit"
        if done.returncode != 0:
            lines = [line for line in (done.stderr + done.stdout).strip().splitlines() if line.strip()]
            return f"ERROR: exit {done.returncode}: {lines[-1][:160] if lines else ''}"
        return None

    def benchmark(self, name: str, script: str, arguments: list[str], timeout: float) -> dict | Row:
        """Run ``benchmarks/<script>`` on this check's device in bf16: its ``--json`` figures, or the
        row that says why there are none."""
        out = self.work / f"{Path(script).stem}.json"
        command = [sys.executable, str(BENCHMARKS / script), "--device", self.device, "--precision", "bf16-mixed",
                   *arguments, "--json", str(out)]
        done, seconds = self.run(name, command, timeout)
        error = self.failure(done, timeout)
        if error:
            return Row(name, "", error, seconds)
        return {**json.loads(out.read_text()), "seconds": seconds}

    # ----------------------------------------------------------------------------------------------
    # Rows 1-3: the quickstart fit, plain, sharded, compiled

    def quickstart_overrides(self) -> list[str]:
        common = ["trainer.precision=bf16-mixed", "trainer.devices=1", "trainer.enable_progress_bar=false",
                  "trainer.enable_model_summary=false", f"trainer.accelerator={self.device}"]
        if self.dry_run:  # 16 steps of 32 with toy towers on the CPU
            return common + ["data.train_size=256", "data.val_size=32", "data.batch_size=32", "trainer.max_epochs=2",
                             "optim.warmup_steps=4", "trainer.log_every_n_steps=2", "model.embed_dim=16",
                             "model.vision={name: clip_vit, image_size: 32, patch_size: 8, width: 32, layers: 1, heads: 2}",
                             "model.text={name: clip_text, context_length: 32, width: 32, layers: 1, heads: 2}"]
        return common + ["data.num_workers=6"]

    def quickstart(self, name: str, extra: list[str], timeout: float) -> Row:
        run_dir = self.work / name.replace(" ", "_").replace(",", "")
        command = command_line("fit", "quickstart", *self.quickstart_overrides(), *extra, "--run-dir", str(run_dir))
        done, seconds = self.run(name, command, timeout)
        error = self.failure(done, timeout)
        if error:
            return Row(name, "", error, seconds)
        self.fit_seconds[name] = seconds
        metrics = json.loads((run_dir / "metrics.json").read_text())
        losses = [float(r["train/loss"]) for r in csv.DictReader((run_dir / "logs" / "version_0" / "metrics.csv").open())
                  if r.get("train/loss")]
        first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
        r1 = {d: (metrics[f"val/{d}_R@1"], metrics[f"val/chance_{d}_R@1"]) for d in ("i2t", "t2i")}
        result = (f"loss {first:.2f} -> {last:.2f}; R@1 i2t {r1['i2t'][0]:.1f}% t2i {r1['t2i'][0]:.1f}% "
                  f"(chance {r1['i2t'][1]:.1f}%); fit {seconds:.0f} s")
        reference = self.fit_seconds.get("quickstart, bf16-mixed")
        if reference is not None and name != "quickstart, bf16-mixed":
            result += f" ({seconds / reference:.2f}x row 1)"
        problems = [f"loss did not fall ({first:.3f} -> {last:.3f})"] if not last < first else []
        problems += [f"{d} R@1 {got:.1f}% not above chance {chance:.1f}%" for d, (got, chance) in r1.items()
                     if not got > chance]
        return Row(name, result, "FAIL: " + "; ".join(problems) if problems else "ok", seconds)

    def compiled(self) -> Row:
        return self.quickstart("quickstart, model.compile", ["model.compile=true"], timeout=600)

    # ----------------------------------------------------------------------------------------------
    # Row 4: throughput against open_clip

    def throughput(self) -> Row:
        name = "throughput vs open_clip"
        size = ["--tiny", "--batch-size", "4", "--warmup", "1", "--steps", "2"] if self.dry_run else \
            ["--batch-size", "256", "--warmup", "3", "--steps", "20"]
        figures = self.benchmark(name, "vs_open_clip_throughput.py", size, timeout=240)
        if isinstance(figures, Row):
            return figures
        ours, theirs = (figures["rows"][key]["samples_per_s"] for key in ("vlm-lab (Lightning)", "open_clip"))
        return Row(name, f"batch {figures['batch_size']} bf16: vlm-lab {ours:.0f} samples/s, open_clip {theirs:.0f} "
                         f"samples/s: {ours / theirs:.2f}x", "ok", figures["seconds"])

    # ----------------------------------------------------------------------------------------------
    # Row 5: the LiT epoch against open_clip

    def lit_epoch(self) -> Row:
        name = "LiT epoch vs open_clip"
        if not FLICKR.is_dir():
            return Row(name, "", f"skip: no Flickr8k at {FLICKR}", 0.0)
        if self.dry_run:
            overrides = [f"data.train_ann={self.flickr_subset(16)}", "data.batch_size=8", "data.num_workers=0",
                         "embedding_cache.storage=memory", "embedding_cache.num_workers=0"]
        else:
            overrides = ["data.num_workers=6", "embedding_cache.num_workers=6"]
        figures = self.benchmark(name, "vs_open_clip_lit_epoch.py", [f"--override={o}" for o in overrides], timeout=300)
        if isinstance(figures, Row):
            return figures
        rows = figures["rows"]
        ours = rows["vlm-lab, embedding cache warm"]["wall_s"]
        theirs = rows["open_clip, `lock_image_tower()`"]["wall_s"]
        return Row(name, f"{figures['steps']} steps: vlm-lab (cache) {ours:.1f} s, open_clip {theirs:.1f} s: "
                         f"{theirs / ours:.2f}x faster", "ok", figures["seconds"])

    def flickr_subset(self, images: int) -> Path:
        """The first ``images`` training images of Flickr8k and their captions, as a COCO captions file."""
        full = json.loads((FLICKR / "annotations" / "captions_train.json").read_text())
        kept = full["images"][:images]
        ids = {image["id"] for image in kept}
        subset = {**full, "images": kept, "annotations": [a for a in full["annotations"] if a["image_id"] in ids]}
        path = self.work / "flickr8k_subset.json"
        path.write_text(json.dumps(subset))
        return path

    # ----------------------------------------------------------------------------------------------
    # Row 6: peak memory with and without gradient checkpointing

    def memory(self) -> Row:
        name = "peak memory, grad checkpointing"
        size = ["--tiny", "--batch-size", "4", "--steps", "1"] if self.dry_run else ["--batch-size", "128", "--steps", "2"]
        figures = self.benchmark(name, "checkpointing.py", size, timeout=240)
        if isinstance(figures, Row):
            return figures
        off, on = (figures["runs"][key][0] for key in ("False", "True"))
        what = off["memory"]
        return Row(name, f"batch {off['batch_size']} bf16, {what}: {off['peak_mib'] / 1024:.2f} GiB without, "
                         f"{on['peak_mib'] / 1024:.2f} GiB with ({figures['ratio_memory']:.2f}x; "
                         f"step {figures['ratio_time']:.2f}x)", "ok", figures["seconds"])

    # ----------------------------------------------------------------------------------------------

    def rows(self):
        yield self.quickstart("quickstart, bf16-mixed", [], timeout=240)
        yield self.quickstart("quickstart, strategy fsdp2", ["trainer.strategy=fsdp2"], timeout=240)
        yield self.compiled()
        yield self.throughput()
        yield self.lit_epoch()
        yield self.memory()


def machine(dry_run: bool) -> str:
    import torch

    device = "CPU dry run" if dry_run else torch.cuda.get_device_name(0)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return f"{device}; torch {torch.__version__}; commit {commit}; {time.strftime('%Y-%m-%d %H:%M %Z')}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="every row at toy sizes on the CPU")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    args = parser.parse_args()
    start = time.perf_counter()
    header = machine(args.dry_run)
    print(f"GPU check: {header}", flush=True)
    lines = ["| check | result | verdict | seconds |", "|---|---|---|---|"]
    rows = []
    with tempfile.TemporaryDirectory() as work:
        for row in Check(args.dry_run, Path(work)).rows():
            rows.append(row)
            lines.append(f"| {row.name} | {row.result} | {row.verdict} | {row.seconds:.0f} |")
            print(f"  {row.name}: {row.verdict} ({row.seconds:.0f} s)", flush=True)
    table = "\n".join(lines)
    total = time.perf_counter() - start
    print(f"\n{header}; {total / 60:.1f} min in all\n\n{table}")
    if args.markdown:
        args.markdown.write_text(f"{header}; {total / 60:.1f} min in all\n\n{table}\n")
    # A dry run checks that every row runs; its toy-size fits need not learn.
    return 0 if all(row.ran if args.dry_run else row.passed for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
