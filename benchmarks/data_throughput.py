"""Images per second through each data module, against a plain PIL decode loop over the same files.

    python benchmarks/data_throughput.py                 # all datasets, 0/1/2 workers, 224 and 64 px
    python benchmarks/data_throughput.py --images 1024 --sizes 224 --workers 0 1 2 4

For each dataset it times (after the first batch, so worker start-up is not counted):

- ``PIL decode``: ``Image.open(...).convert("RGB")`` over the same files (shard members for the
  streaming module), in one process: the cost of decoding alone;
- the data module's training loader at each worker count: decode, the tower's transform (resize,
  crop, normalise) and tokenisation of the captions, batched; and the CPU time it took per image,
  summed over the main process and the workers. Busy neighbours slow the first down but hardly the
  second, so the last column projects the 2-worker speed-up on two idle cores from it.
- each loader with three kinds of pixels (``--pixels``): ``float``, normalised float32 from the
  workers (what the data modules do by default); ``uint8``, the transform stopped before
  normalising (``build_transform(..., normalize=False)``, a quarter of the bytes) and the batch
  normalised in the main process as it arrives (``normalize_pixels``: what the model does on a CPU
  machine); ``uint8-device``, the same without that last step, which on a GPU machine the model
  does on the GPU, off the CPU;
- and two ways of handing batches over from the workers (``--handoff``): ``slots``, reused
  shared-memory slots (``data.worker_slots: 4``, the default; ``vlm_lab/data/handoff.py``), and
  ``pytorch``, PyTorch's own (``data.worker_slots: 0``: fresh shared memory for every tensor).

Datasets (from ``../shared/data``): COCO (coco-mini train2017, 80 photos of about 640x480, each
listed 10 times in a captions file), Flickr8k (train, 224x224 JPEGs), the streaming module on the
real CC12M shard (32 img2dataset samples, resized to at most 512 px on the long side as img2dataset
does, copied into 24 shards), and the streaming module on Flickr8k written as img2dataset shards by
``vlm-lab data convert`` (into a temporary folder).

The main process runs torch with one thread, as loader workers do (see ``main``). Timings
depend on what else runs on the machine: check ``uptime`` first.
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import resource
import sys
import tarfile
import tempfile
import time
from itertools import islice
from pathlib import Path
from typing import Callable, Iterable

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from vlm_lab.data.cc3m import CC3MDataModule  # noqa: E402
from vlm_lab.data.coco import CocoCaptionsDataModule  # noqa: E402
from vlm_lab.data.convert import coco_to_shards  # noqa: E402
from vlm_lab.data.transforms import build_transform, normalize_pixels  # noqa: E402
from vlm_lab.tokenizer import load_tokenizer  # noqa: E402
from vlm_lab.towers.base import ImageConfig  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def measure(loader: DataLoader, images: int,
            image_config: ImageConfig | None = None) -> tuple[float, float, float]:
    """(images/s, CPU ms per image, of which the main process's) over ``images`` images, epoch after epoch.

    All are taken from the end of the first batch, so starting the workers is not counted; the CPU
    time is the main process's plus every worker's (see ``cpu_seconds``). With ``image_config``,
    ``uint8`` pixels are normalised in the main process, inside the timing.
    """
    start, count, cpu_start, main_start = None, 0, 0.0, 0.0
    while count < images:
        for batch in loader:  # a new pass (and new workers) when an epoch ends first
            if start is None:
                start, cpu_start, main_start = time.perf_counter(), cpu_seconds(), time.process_time()
                continue
            if image_config is not None and batch["pixel_values"].dtype == torch.uint8:
                normalize_pixels(batch["pixel_values"], image_config)
            count += len(batch["image_ids"])
            if count >= images:
                break
    elapsed, cpu, main = time.perf_counter() - start, cpu_seconds() - cpu_start, time.process_time() - main_start
    return count / elapsed, 1000 * cpu / count, 1000 * main / count


def cpu_seconds() -> float:
    """CPU time (user + system) of this process and its children: the loader workers, running (read
    from /proc) or finished and reaped (``RUSAGE_CHILDREN``), as workers restart every epoch."""
    total = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        usage = resource.getrusage(who)
        total += usage.ru_utime + usage.ru_stime
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        if int(fields[1]) == os.getpid():  # ppid
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime
    return total


def _decode_files(files: list[str]) -> None:
    for path in files:
        Image.open(path).convert("RGB")


def parallel_decode_speedup(files: list[str]) -> float:
    """How much faster two processes decode ``files`` (each its own copy) than one process does.

    About 2.0 on two free cores; well below that, the machine's second core is not a whole core
    (busy, or a hyperthread), and no loader can reach 2x there.
    """
    import multiprocessing

    def timed(processes: int) -> float:
        workers = [multiprocessing.Process(target=_decode_files, args=(files,)) for _ in range(processes)]
        start = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return processes * len(files) / (time.perf_counter() - start)

    return timed(2) / timed(1)


def pil_rate(sources: Callable[[], Iterable[bytes | str]], images: int) -> float:
    start, count = time.perf_counter(), 0
    while count < images:
        for source in sources():
            Image.open(io.BytesIO(source) if isinstance(source, bytes) else source).convert("RGB")
            count += 1
            if count >= images:
                break
    return count / (time.perf_counter() - start)


def shard_images(shards: list[Path]) -> Iterable[bytes]:
    for shard in shards:
        with tarfile.open(shard) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    yield tar.extractfile(member).read()


def repeated_coco_captions(root: Path, out: Path, times: int) -> str:
    """coco-mini's train captions file with every image listed ``times`` times (distinct ids).

    80 images make an epoch of 2 batches, so a measurement would time epoch restarts rather than
    loading; 800 entries make epochs long enough, over the same files.
    """
    data = json.loads((root / "annotations" / "captions_train2017.json").read_text())
    images = [{**image, "id": copy * 10**7 + image["id"]} for copy in range(times) for image in data["images"]]
    annotations = [{**a, "image_id": copy * 10**7 + a["image_id"]} for copy in range(times) for a in data["annotations"]]
    path = out / "captions_train2017_x10.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    return str(path)


def repeated_shard(shard: Path, out: Path, copies: int) -> list[Path]:
    """``copies`` copies of one shard, with their samples renamed apart (img2dataset keys are unique).

    32 samples make an epoch of one batch; copies give the streaming loader epochs long enough to
    time loading rather than start-up, over the same real images.
    """
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with tarfile.open(shard) as source:
        members = [(member, source.extractfile(member).read()) for member in source if member.isfile()]
    for copy in range(copies):
        path = out / f"{copy:05d}.tar"
        with tarfile.open(path, "w") as target:
            for member, data in members:
                renamed = tarfile.TarInfo(f"{copy:02d}{member.name}")
                renamed.size = len(data)
                target.addfile(renamed, io.BytesIO(data))
        paths.append(path)
    return paths


def with_uint8_pixels(data_module: type) -> type:
    """``data_module`` whose loaders hand over ``uint8`` pixels (the transform stops before normalising)."""

    class Uint8Pixels(data_module):
        def transform(self, split: str):
            return build_transform(self.image_config, augment=self.augment and split == "train", normalize=False)

    return Uint8Pixels


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=768, help="images timed per measurement")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64], help="tower input sizes")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--pixels", nargs="+", choices=["float", "uint8", "uint8-device"],
                        default=["float", "uint8-device"], help="the pixels loader workers hand over")
    parser.add_argument("--handoff", nargs="+", choices=["slots", "pytorch"], default=["slots", "pytorch"],
                        help="how loader workers hand batches over (data.worker_slots 4 or 0)")
    parser.add_argument("--datasets", nargs="+", choices=["coco", "flickr8k", "cc12m", "shards"],
                        default=["coco", "flickr8k", "cc12m", "shards"])
    args = parser.parse_args()
    if not DATA.is_dir():
        print(f"needs the real data at {DATA}", file=sys.stderr)
        return 2

    # As in DataLoader workers: one intra-op thread. With torch's default (one per core), the
    # 0-worker loop measures thread-pool contention, not data loading: 20x slower when the cores
    # are busy. A training process sets its own thread count for the model.
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(None)
    flickr = dict(train_ann=str(DATA / "flickr8k" / "annotations" / "captions_train.json"),
                  train_images=str(DATA / "flickr8k" / "images"))
    rows = []
    loads = [os.getloadavg()[0]]
    decode_check = parallel_decode_speedup(sorted(str(p) for p in (DATA / "coco-mini" / "train2017").glob("*.jpg")) * 10)
    with tempfile.TemporaryDirectory() as tmp:
        coco = dict(train_ann=repeated_coco_captions(DATA / "coco-mini", Path(tmp), times=10),
                    train_images=str(DATA / "coco-mini" / "train2017"))
        cc12m = repeated_shard(DATA / "cc12m-shard" / "cc12m-train-0000.tar", Path(tmp) / "cc12m", copies=24)
        shards = coco_to_shards(flickr["train_ann"], flickr["train_images"], Path(tmp) / "shards", per="image",
                                shard_size=1000).shards
        for size in args.sizes:
            # OpenAI CLIP's preprocessing at this size: bicubic short-side resize, centre crop.
            image_config = ImageConfig(size=(size, size), mean=(0.4815, 0.4578, 0.4082),
                                       std=(0.2686, 0.2613, 0.2758), interpolation="bicubic")
            common = dict(tokenizer=tokenizer, image_config=image_config, max_length=32, batch_size=args.batch_size)
            datasets = {
                "coco": ("COCO (coco_captions, coco-mini x10)", CocoCaptionsDataModule, coco,
                         lambda dm: [r.path for r in dm.records("train")]),
                "flickr8k": ("Flickr8k (coco_captions)", CocoCaptionsDataModule, flickr,
                             lambda dm: [r.path for r in dm.records("train")]),
                "cc12m": ("CC12M shard x24 (cc3m, webdataset)", CC3MDataModule,
                          dict(train_shards=[str(s) for s in cc12m]), lambda dm: shard_images(cc12m)),
                "shards": ("Flickr8k shards (cc3m, webdataset)", CC3MDataModule,
                           dict(train_shards=[str(s) for s in shards]), lambda dm: shard_images(shards)),
            }
            for key in args.datasets:
                name, data_module, paths, files = datasets[key]
                pil = pil_rate(lambda: files(data_module(**common, **paths)), args.images)
                for pixels in args.pixels:
                    make = data_module if pixels == "float" else with_uint8_pixels(data_module)
                    normalized_by = image_config if pixels == "uint8" else None
                    for handoff in args.handoff:
                        worker_slots = 4 if handoff == "slots" else 0
                        rates, costs, main_costs = {}, {}, {}
                        for workers in args.workers:
                            loader = make(**common, **paths, num_workers=workers,
                                          worker_slots=worker_slots).train_dataloader()
                            rates[workers], costs[workers], main_costs[workers] = measure(loader, args.images,
                                                                                          normalized_by)
                            del loader
                            gc.collect()  # stops this loader's workers before the next one forks its own
                            print(f"{size}px {name}, {pixels} pixels, {handoff}: {workers} worker(s): "
                                  f"{rates[workers]:.0f} images/s, {costs[workers]:.2f} CPU ms/image", file=sys.stderr)
                        rows.append((size, name, pixels, handoff, pil, rates, costs, main_costs))
                        loads.append(os.getloadavg()[0])

    print(f"\nbatch {args.batch_size}, {args.images} images per measurement, {os.cpu_count()} CPUs, "
          f"1-minute load average {min(loads):.1f} to {max(loads):.1f}\n")
    print(f"the same JPEG decode loop in two processes at once: {decode_check:.2f}x one process\n")
    print("images/s (CPU ms per image, main process and workers together):\n")
    columns = ["size", "data module", "pixels", "hand-off", "PIL decode only", *(f"{w} workers" for w in args.workers)]
    if 2 in args.workers:
        columns.append("2 workers: CPU ms main / workers")
    compare = 0 in args.workers and 2 in args.workers
    if compare:
        columns += ["2 vs 0 workers", "2 vs 0 from CPU ms (idle cores)"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for size, name, pixels, handoff, pil, rates, costs, main_costs in rows:
        cells = [f"{size}px", name, pixels, handoff, f"{pil:.0f}",
                 *(f"{rates[w]:.0f} ({costs[w]:.2f})" for w in args.workers)]
        if 2 in args.workers:
            # Where the 2-worker CPU goes: the main process receives batches, the workers load and
            # hand them over (compare with the 0-worker cost: the difference is the hand-over).
            cells.append(f"{main_costs[2]:.2f} / {costs[2] - main_costs[2]:.2f}")
        if compare:
            # On two idle cores, two workers can at best do 2 cores / (CPU per image with workers).
            cells += [f"{rates[2] / rates[0]:.2f}x", f"{2 * costs[0] / costs[2]:.2f}x"]
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
