"""Does a loader worker keep the memory it frees? glibc's mallopt against its MALLOC_* variables.

    python benchmarks/worker_malloc.py                # 800 Flickr8k images per measurement
    python benchmarks/worker_malloc.py --images 1600

A slot worker (``vlm_lab/data/handoff.py``) decodes and transforms 32 images, then stacks them into
its slot: it never frees anything bigger than one image's tensors, so glibc keeps handing that memory
back to the kernel and faulting it in again. This times that loop (decode, the 224 px CLIP transform,
``torch.stack`` into a preallocated batch) in a child process started by ``fork`` (what Linux's
DataLoader does by default) or ``spawn``, with:

- ``default``: glibc's own thresholds;
- ``mallopt``: ``handoff.keep_freed_memory()`` in the child (fixed 32 / 64 MB thresholds);
- ``MALLOC_* env``: ``MALLOC_MMAP_THRESHOLD_`` / ``MALLOC_TRIM_THRESHOLD_`` set to the same values in
  the environment before the child starts. glibc reads them once, when a process starts.

Page faults per image (``ru_minflt``) say whether memory went back to the kernel; they do not depend
on what else runs on the machine, the CPU time does somewhat.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from vlm_lab.data.handoff import WORKER_MMAP_THRESHOLD, WORKER_TRIM_THRESHOLD, keep_freed_memory
from vlm_lab.data.transforms import build_transform
from vlm_lab.towers.base import ImageConfig

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
BATCH = 32
ENVIRONMENT = {"MALLOC_MMAP_THRESHOLD_": str(WORKER_MMAP_THRESHOLD), "MALLOC_TRIM_THRESHOLD_": str(WORKER_TRIM_THRESHOLD)}


def worker_loop(files: list[str], images: int, tune: bool, results: multiprocessing.Queue) -> None:
    """In the child: (CPU ms, page faults) per image over ``images`` images, after one warm-up batch."""
    torch.set_num_threads(1)  # as in DataLoader workers
    if tune:
        keep_freed_memory()
    transform = build_transform(ImageConfig(size=(224, 224), mean=(0.4815, 0.4578, 0.4082),
                                            std=(0.2686, 0.2613, 0.2758), interpolation="bicubic"))
    slot = torch.empty(BATCH, 3, 224, 224)

    def run(count: int) -> None:
        batch = []
        for i in range(count):
            batch.append(transform(Image.open(files[i % len(files)]).convert("RGB")))
            if len(batch) == BATCH:
                torch.stack(batch, out=slot)
                batch = []

    run(BATCH)
    cpu, faults = time.process_time(), resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    run(images)
    results.put((1000 * (time.process_time() - cpu) / images,
                 (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / images))


def measure(method: str, tune: bool, environment: bool, files: list[str], images: int) -> tuple[float, float]:
    context = multiprocessing.get_context(method)
    results = context.Queue()
    saved = {name: os.environ.get(name) for name in ENVIRONMENT}
    if environment:
        os.environ.update(ENVIRONMENT)
    try:
        child = context.Process(target=worker_loop, args=(files, images, tune, results))
        child.start()
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    measured = results.get()
    child.join()
    return measured


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=800, help="images timed per measurement")
    args = parser.parse_args()
    images_dir = DATA / "flickr8k" / "images"
    if not images_dir.is_dir():
        print(f"needs the real data at {DATA}", file=sys.stderr)
        return 2
    files = sorted(str(p) for p in images_dir.glob("*.jpg"))[:256]
    print(f"{args.images} Flickr8k images per measurement, 224 px, batches of {BATCH}, "
          f"1-minute load average {os.getloadavg()[0]:.1f}\n")
    print("| worker started by | malloc thresholds | page faults per image | CPU ms per image |")
    print("|---|---|---|---|")
    for method in ("fork", "spawn"):
        for name, tune, environment in (("default", False, False), ("mallopt", True, False),
                                        ("MALLOC_* env", False, True)):
            cpu, faults = measure(method, tune, environment, files, args.images)
            print(f"| {method} | {name} | {faults:.0f} | {cpu:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
