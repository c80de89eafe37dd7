"""The evaluation suite on a fixed model, 1 process against 2 (gloo), and the memory of a COCO-size retrieval.

    python benchmarks/eval_suite.py
    python benchmarks/eval_suite.py --per-class 100 --flickr-images 1000 --threads 1

1. **Speed**: the same evaluators (``eval`` section of ``vlm_lab/eval/suite.py``) on the same model
   (the quickstart CLIP at 64 px, seed 0, untrained: what it scores does not matter here, how long
   it takes does) run once in one process and once in two gloo processes that split the data
   (``shard_indices``) and gather it back. The figures of both runs must agree (the script checks
   it); their wall times and the ratio are printed. Each process uses ``--threads`` torch threads,
   so two processes use twice the cores of one: the comparison is of data parallelism, as on a GPU
   node with one process per GPU.

   The evaluators: ``zeroshot`` and ``fewshot`` on the shared CIFAR-10 test images (``--per-class``
   per class; few-shot draws from the first half of each class and tests on the rest), and
   ``retrieval`` on ``--flickr-images`` images of Flickr8k val with their 5 captions each.
2. **Memory**: ``retrieval_metrics`` on 5,000 x 25,000 random 512-d features (COCO 5k's shape),
   in a fresh process: the peak resident memory above the features themselves (chunked scores,
   ``chunk_size`` rows at a time).

Needs ``../shared/data`` (cifar10-test, flickr8k). Timings depend on what else runs: check ``uptime``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"


def evaluator_specs(per_class: int, flickr_images: int, workdir: Path) -> dict:
    """The suite: the few-shot train and test folders are links to halves of each CIFAR-10 class."""
    cifar = SHARED / "cifar10-test"
    for split, (start, stop) in (("train", (0, per_class // 2)), ("test", (per_class // 2, per_class))):
        for class_dir in sorted(cifar.iterdir()):
            target = workdir / split / class_dir.name
            target.mkdir(parents=True, exist_ok=True)
            for image in sorted(class_dir.iterdir())[start:stop]:
                if not (target / image.name).exists():
                    (target / image.name).symlink_to(image)
    annotations = json.loads((SHARED / "flickr8k" / "annotations" / "captions_val.json").read_text())
    keep = {image["id"] for image in annotations["images"][:flickr_images]}
    subset = {"images": [i for i in annotations["images"] if i["id"] in keep],
              "annotations": [a for a in annotations["annotations"] if a["image_id"] in keep]}
    (workdir / "flickr_val.json").write_text(json.dumps(subset))
    return {
        "cifar10": {"name": "zeroshot", "root": str(cifar), "classnames": "cifar10", "templates": "cifar10",
                    "max_per_class": per_class, "batch_size": 100},
        "cifar10_fewshot": {"name": "fewshot", "root": str(workdir / "train"), "test_root": str(workdir / "test"),
                            "batch_size": 100, "shots": [1, 5, 10, 25]},
        "flickr": {"name": "retrieval", "batch_size": 100,
                   "data": {"name": "coco_captions", "val_ann": str(workdir / "flickr_val.json"),
                            "val_images": str(SHARED / "flickr8k" / "images")}},
    }


def run_suite(specs: dict) -> tuple[dict[str, float], float, float]:
    """(figures, wall seconds, CPU seconds of this process) of the suite on the fixed model."""
    import lightning as L

    import vlm_lab
    from vlm_lab.eval.suite import build_evaluators, run_evaluators
    from vlm_lab.schema import EvalSettings

    L.seed_everything(0, verbose=False)
    module = vlm_lab.build_module(vlm_lab.load_config(REPO / "experiments" / "quickstart.yaml"))
    evaluators = build_evaluators(EvalSettings.from_config({"evaluators": specs}))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # both processes start the clock together
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = run_evaluators(module, evaluators)
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # the suite is done when the slower process is
    return metrics, time.perf_counter() - wall, time.process_time() - cpu


def worker(rank: int, store: str, specs_file: str, out: str, threads: int) -> None:
    torch.set_num_threads(threads)
    torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    metrics, wall, cpu = run_suite(json.loads(Path(specs_file).read_text()))
    Path(out).write_text(json.dumps({"metrics": metrics, "wall": wall, "cpu": cpu}))
    torch.distributed.destroy_process_group()


def retrieval_memory() -> float:
    """MB of peak resident memory above the features, for retrieval_metrics on 5,000 x 25,000 x 512."""
    from vlm_lab.eval.retrieval import retrieval_metrics

    generator = torch.Generator().manual_seed(0)
    images, texts = torch.randn(5000, 512, generator=generator), torch.randn(25000, 512, generator=generator)
    owners = torch.arange(25000) // 5
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    retrieval_metrics(images, texts, owners)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-class", type=int, default=100, help="CIFAR-10 images per class")
    parser.add_argument("--flickr-images", type=int, default=1000, help="Flickr8k val images (5 captions each)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        specs = evaluator_specs(args.per_class, args.flickr_images, workdir)
        (workdir / "specs.json").write_text(json.dumps(specs))
        torch.set_num_threads(args.threads)
        one, one_wall, one_cpu = run_suite(specs)
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(rank), str(workdir / "store"),
                                   str(workdir / "specs.json"), str(workdir / f"{rank}.json"), str(args.threads)])
                 for rank in range(2)]
        for proc in procs:
            if proc.wait() != 0:
                raise SystemExit("a worker failed")
        ranks = [json.loads((workdir / f"{rank}.json").read_text()) for rank in range(2)]
        memory = subprocess.run([sys.executable, __file__, "--memory"], capture_output=True, text=True, check=True)
    two_wall = max(r["wall"] for r in ranks)
    differing = [k for k in one if any(abs(r["metrics"][k] - one[k]) > 1e-6 for r in ranks)]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}; "
          f"{args.threads} thread(s) per process; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"suite: zeroshot + fewshot on {10 * args.per_class} CIFAR-10 images, retrieval on {args.flickr_images} "
          f"Flickr8k val images x 5 captions")
    print("| processes | wall s | CPU s (per process) |\n|---|---|---|")
    print(f"| 1 | {one_wall:.1f} | {one_cpu:.1f} |")
    per_rank = " / ".join(f"{r['cpu']:.1f}" for r in ranks)
    print(f"| 2 | {two_wall:.1f} | {per_rank} |")
    print(f"speed-up with 2 processes: {one_wall / two_wall:.2f}x; figures equal: {not differing} {differing or ''}")
    print(f"retrieval_metrics on 5,000 x 25,000 x 512: {memory.stdout.strip()} MB peak above the features")
    print("figures:", json.dumps({k: round(v, 2) for k, v in one.items() if "chance" not in k}))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        sys.path.insert(0, str(REPO))
        worker(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6]))
    elif sys.argv[1:2] == ["--memory"]:
        sys.path.insert(0, str(REPO))
        print(f"{retrieval_memory():.0f}")
    else:
        main()
