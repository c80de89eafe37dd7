"""What a self-contained checkpoint costs in bytes, and what loading one saves in time.

    python benchmarks/checkpoint_portability.py               # quickstart and LiT, 5 loads each way
    python benchmarks/checkpoint_portability.py --repeats 3 --recipes lit

For each recipe (``experiments/quickstart.yaml``; the LiT headline ``experiments/lit/flickr8k_lit.yaml``,
EfficientNet-Lite0 locked + MiniLM-L6) the model trains one step on the synthetic shapes (the data
does not change what a checkpoint holds) and ``vlm-lab fit`` writes ``last.ckpt``, optimizer state
included. The same file without its ``vlm_lab`` entry is what the e956f06 release wrote (format 1).

Sizes: both files, and the entry's parts (the tokenizer's files, the pickled model section).

Loading: ``VisionLanguageModule.load_from_checkpoint`` of each file, alternating, after one warm-up
load of each (the weight files sit in the page cache for both). A format-1 file re-runs the recipe:
it reads the catalog and the pretrained weights (EfficientNet-Lite0 and MiniLM from their packages)
and builds the towers with them, and the checkpoint's weights then overwrite them. A format-2 file
builds the towers from their architecture and loads the checkpoint's weights only. Reported: median
wall-clock and CPU seconds (this process, all threads) per load, and how often pretrained weights
were looked up (calls of ``packaged_path``). Timings depend on what else runs: check ``uptime``.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPOSITORY = Path(__file__).resolve().parents[1]
RECIPES = {
    "quickstart": [REPOSITORY / "experiments" / "quickstart.yaml"],
    "lit": [REPOSITORY / "experiments" / "lit" / "flickr8k_lit.yaml"],
}
ONE_STEP = ["data={name: synthetic_shapes, train_size: 16, val_size: 8, batch_size: 8}", "eval.every_n_epochs=0",
            "embedding_cache.storage=memory", "trainer.max_steps=1", "trainer.max_epochs=1",
            "trainer.accelerator=cpu", "trainer.limit_val_batches=0", "trainer.num_sanity_val_steps=0",
            "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false", "trainer.logger=false"]


def write_checkpoints(recipe: str, directory: Path) -> tuple[Path, Path]:
    """``last.ckpt`` of a one-step fit (format 2), and the same file without the entry (format 1)."""
    import vlm_lab

    cfg = vlm_lab.load_config(*RECIPES[recipe], overrides=ONE_STEP)
    vlm_lab.fit(cfg, run_dir=directory / "run")
    new = directory / "run" / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(new, map_location="cpu", weights_only=True)
    del checkpoint["vlm_lab"]
    old = directory / "format1.ckpt"
    torch.save(checkpoint, old)
    return old, new


def time_loads(paths: dict[str, Path], repeats: int) -> dict[str, dict[str, float]]:
    from vlm_lab import VisionLanguageModule
    from vlm_lab.towers import hf, packaged

    lookups = {"count": 0}
    original = packaged.packaged_path

    def counted(*args, **kwargs):
        lookups["count"] += 1
        return original(*args, **kwargs)

    packaged.packaged_path = hf.packaged_path = counted  # this process only; it ends after the benchmark
    results: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": [], "lookups": []} for name in paths}
    for attempt in range(repeats + 1):  # the first round warms up (imports, page cache)
        for name, path in paths.items():
            lookups["count"] = 0
            wall, cpu = time.perf_counter(), time.process_time()
            VisionLanguageModule.load_from_checkpoint(path, map_location="cpu", weights_only=True)
            if attempt:
                results[name]["wall"].append(time.perf_counter() - wall)
                results[name]["cpu"].append(time.process_time() - cpu)
                results[name]["lookups"].append(lookups["count"])
    return {name: {key: statistics.median(values) for key, values in r.items()} for name, r in results.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()

    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
              "load_average": os.getloadavg(), "torch_threads": torch.get_num_threads(),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=REPOSITORY).stdout.strip(), "recipes": {}}
    for recipe in args.recipes:
        with tempfile.TemporaryDirectory() as directory:
            old, new = write_checkpoints(recipe, Path(directory))
            entry = torch.load(new, map_location="cpu", weights_only=True, mmap=True)["vlm_lab"]
            tokenizer_bytes = sum(len(data) for data in entry["tokenizer_files"].values())
            buffer = io.BytesIO()
            pickle.dump(entry["model"], buffer)
            loads = time_loads({"format 1 (re-runs the recipe)": old, "format 2 (self-contained)": new},
                               args.repeats)
            report["recipes"][recipe] = {"bytes format 1": old.stat().st_size, "bytes format 2": new.stat().st_size,
                                         "tokenizer bytes": tokenizer_bytes, "model section bytes": buffer.tell(),
                                         "loads": loads}
    print(json.dumps(report, indent=2))
    for recipe, r in report["recipes"].items():
        added = r["bytes format 2"] - r["bytes format 1"]
        print(f"\n{recipe}: {r['bytes format 1'] / 1e6:.1f} MB -> {r['bytes format 2'] / 1e6:.1f} MB "
              f"(+{added / 1e6:.2f} MB, +{100 * added / r['bytes format 1']:.1f}%: tokenizer "
              f"{r['tokenizer bytes'] / 1e6:.2f} MB, model section {r['model section bytes'] / 1e3:.1f} kB)")
        for name, t in r["loads"].items():
            print(f"  load {name:<32} {t['wall']:.2f} s wall, {t['cpu']:.2f} s CPU, "
                  f"{t['lookups']:.0f} pretrained-weight lookups")
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    sys.exit(main())
