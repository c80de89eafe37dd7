"""A scale rehearsal of shard streaming: 2,000 shards, 1,000,000 samples, 8 simulated ranks x 2 workers.

    python benchmarks/stream_scale.py                       # generate under /tmp (kept for reruns), measure
    python benchmarks/stream_scale.py --delete              # ... and delete the shards afterwards
    python benchmarks/stream_scale.py --shards 64           # a small dry run of every step

The shards are generated once into ``--root`` (default ``/tmp/vlm_lab_stream_scale``), as
img2dataset writes them (``NNNNN.tar`` + ``NNNNN_stats.json``): ``--per-shard`` (500) samples each,
an 8x8 JPEG (16 variants, encoded once) and a caption, keys ``SSSSSIIII`` so a sample's id tells
its shard and place. They form three sources, ``a`` (half the shards), ``b`` (30%) and ``c``
(20%). About 1.3 MB per shard: 2.6 GB for 2,000.

It then measures, on this machine, through the ``cc3m`` data module and its ``StreamLoader``:

1. exact epoch: the three sources as one stream (``data.train_sources``, no resampling), read by 8
   simulated ranks one after the other, each with 2 loader workers, as on a cluster: each rank builds
   its own data module (it lists the shards and reads their 2,000 stats files, not the tars), its
   stream and loader; the time from there to its first batch; then the whole epoch of every rank,
   counting how often each of the 1,000,000 samples was seen (exactly once, across the 16
   readers), and the main process's RSS after 20,000 samples and after each 100,000;
2. resampled mixture: weights 0.2 / 0.3 / 0.5 (the opposite of the sources' sizes), 8 ranks x 2
   workers, ``--resampled-samples`` per epoch; the observed shares of each source;
3. the reader alone against the PyTorch default loader over the same 40 shards (20,000 samples),
   2 workers, batch 250: vlm-lab's stream (decode, transform, tokenise, batch) and a
   ``torch.utils.data.DataLoader`` with its default collate over ``webdataset.WebDataset`` doing the
   same decode and transform (captions stay strings: it tokenises nothing), samples/s and CPU
   seconds (main process and workers).

The exact epoch (1) runs the real pipeline (decode, transform, tokenise, batches handed over in the
shared-memory slots) at a 16-pixel tower size, which keeps 1,000,000 samples to minutes on two
cores; the resampled one (2) only counts: its batches hold image ids, no pixels or tokens. Step 3
runs at the tower size of ``tests/configs/tiny.yaml`` (32 px).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import shutil
import sys
import tarfile
import time
from itertools import islice
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import webdataset as wds  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from data_throughput import cpu_seconds  # noqa: E402
from vlm_lab.data.cc3m import CC3MDataModule  # noqa: E402
from vlm_lab.data.shards import StreamLoader  # noqa: E402
from vlm_lab.data.transforms import build_transform, decode_size, open_image  # noqa: E402
from vlm_lab.tokenizer import load_tokenizer  # noqa: E402
from vlm_lab.towers.base import ImageConfig  # noqa: E402

SOURCES = {"a": 0.5, "b": 0.3, "c": 0.2}  # share of the shards
WEIGHTS = {"a": 0.2, "b": 0.3, "c": 0.5}  # the resampled mixture's
RANKS, WORKERS, BATCH = 8, 2, 250
SMALL = ImageConfig(size=(16, 16), mean=(0.5,) * 3, std=(0.5,) * 3)  # the epoch passes
TINY = ImageConfig(size=(32, 32), mean=(0.5,) * 3, std=(0.5,) * 3)  # the reader comparison


# --------------------------------------------------------------------------------------------------
# The shards


def jpegs() -> list[bytes]:
    images = []
    for k in range(16):
        buffer = io.BytesIO()
        Image.new("RGB", (8, 8), (16 * k, 255 - 16 * k, 90)).save(buffer, format="JPEG", quality=80)
        images.append(buffer.getvalue())
    return images


def layout(shards: int) -> dict[str, range]:
    """Which shard numbers make each source."""
    ranges, start = {}, 0
    for index, (name, share) in enumerate(SOURCES.items()):
        end = shards if index == len(SOURCES) - 1 else start + round(shards * share)
        ranges[name] = range(start, end)
        start = end
    return ranges


def generate(root: Path, shards: int, per_shard: int) -> float:
    """Write the shards unless ``root`` holds exactly these; return the seconds it took (0: reused)."""
    manifest = {"shards": shards, "per_shard": per_shard, "format": 1}
    if (root / "manifest.json").is_file() and json.loads((root / "manifest.json").read_text()) == manifest:
        return 0.0
    shutil.rmtree(root, ignore_errors=True)
    start, images = time.perf_counter(), jpegs()
    for name, numbers in layout(shards).items():
        (root / name).mkdir(parents=True)
        for shard in numbers:
            buffer = io.BytesIO()
            with tarfile.open(fileobj=buffer, mode="w") as tar:
                for i in range(per_shard):
                    key = f"{shard:05d}{i:04d}"
                    for extension, data in (("jpg", images[i % 16]), ("txt", f"source {name} shard {shard} "
                                                                             f"picture {i}".encode())):
                        info = tarfile.TarInfo(f"{key}.{extension}")
                        info.size = len(data)
                        tar.addfile(info, io.BytesIO(data))
            (root / name / f"{shard:05d}.tar").write_bytes(buffer.getvalue())
            (root / name / f"{shard:05d}_stats.json").write_text(json.dumps({"count": per_shard,
                                                                              "successes": per_shard}))
    (root / "manifest.json").write_text(json.dumps(manifest))
    return time.perf_counter() - start


def sources(root: Path, shards: int, weights: bool = False) -> list[dict]:
    return [{"name": name, "shards": f"{root / name}/{{{numbers[0]:05d}..{numbers[-1]:05d}}}.tar",
             **({"weight": WEIGHTS[name]} if weights else {})} for name, numbers in layout(shards).items()]


def disk_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


# --------------------------------------------------------------------------------------------------
# Measuring


def rss_mb() -> float:
    """This process's resident memory now (not its peak), in MB."""
    pages = int(Path("/proc/self/statm").read_text().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def no_pixels(image: Image.Image) -> torch.Tensor:
    return torch.zeros(1)


def ids_only(samples: list[dict]) -> dict[str, torch.Tensor]:
    return {"image_ids": torch.tensor([s["image_id"] for s in samples])}


def rank_loader(tokenizer, rank: int, data: dict, ids: bool = False) -> tuple[StreamLoader, float]:
    """A rank's data module, stream and loader, built as that rank would; and the seconds it took.
    ``ids``: batches of image ids only (no pixels, no tokens)."""
    start = time.perf_counter()
    dm = CC3MDataModule(tokenizer, SMALL, 32, batch_size=BATCH, num_workers=WORKERS, **data)
    stream = dm.stream("train", rank, RANKS)
    if ids:
        stream.transform, stream.collate = no_pixels, ids_only
    loader = StreamLoader(stream, seed=0, epoch=lambda: 0, num_workers=WORKERS, slots=dm.slots("train"))
    return loader, time.perf_counter() - start


def exact_epoch(root: Path, shards: int, per_shard: int, tokenizer) -> dict:
    """Step 1: first batch per rank, coverage of the whole epoch, RSS along it."""
    seen = np.zeros(shards * per_shard, dtype=np.uint8)
    firsts, plans, rss, total = [], [], [], 0
    next_mark = 20_000
    for rank in range(RANKS):
        start = time.perf_counter()
        loader, planned = rank_loader(tokenizer, rank, {"train_sources": sources(root, shards)})
        plans.append(planned)
        for number, batch in enumerate(loader):
            if number == 0:
                firsts.append(time.perf_counter() - start)
            ids = batch["image_ids"].numpy()
            np.add.at(seen, ids // 10_000 * per_shard + ids % 10_000, 1)
            total += len(ids)
            if total >= next_mark:
                rss.append((total, rss_mb()))
                next_mark = 100_000 if next_mark == 20_000 else next_mark + 100_000
        print(f"  rank {rank}: first batch after {firsts[-1]:.2f} s (data module + plan {planned:.2f} s), "
              f"{total:,} samples so far, RSS {rss_mb():.0f} MB", flush=True)
    if rss[-1][0] != total:
        rss.append((total, rss_mb()))
    counts = collections.Counter(seen.tolist())
    return {"first_batch_s": firsts, "plan_s": plans, "rss": rss, "samples": total, "seen_counts": dict(counts)}


def resampled_epoch(root: Path, shards: int, samples: int, tokenizer) -> dict:
    """Step 2: the shares of each source in a resampled epoch of the weighted mixture."""
    layout_ = layout(shards)
    share = collections.Counter()
    data = {"train_sources": sources(root, shards, weights=True), "resampled": True, "train_samples": samples}
    for rank in range(RANKS):
        loader, _ = rank_loader(tokenizer, rank, data, ids=True)
        for batch in loader:
            for shard in (batch["image_ids"] // 10_000).tolist():
                share[next(name for name, numbers in layout_.items() if shard in numbers)] += 1
    total = sum(share.values())
    return {"samples": total, "shares": {name: share[name] / total for name in SOURCES}}


def timed(batches, samples: int) -> tuple[float, float, int]:
    """(wall s, CPU s of the process and its workers, samples) to read ``samples`` after the first batch."""
    iterator = iter(batches)
    next(iterator)  # workers started, first batch in: not counted
    start, cpu, count = time.perf_counter(), cpu_seconds(), 0
    for batch in iterator:
        count += len(batch["image_ids"] if isinstance(batch, dict) else batch[0])
        if count >= samples:
            break
    return time.perf_counter() - start, cpu_seconds() - cpu, count


def reader_comparison(root: Path, tokenizer, shards: int = 40) -> dict:
    """Step 3: vlm-lab's stream against PyTorch's default loader over webdataset, same shards."""
    urls = [str(path) for path in sorted((root / "a").glob("*.tar"))[:shards]]
    samples = (shards - 2) * 500  # the first batch excluded, and slack for the last partial ones
    dm = CC3MDataModule(tokenizer, TINY, 32, train_shards=urls, batch_size=BATCH, num_workers=WORKERS)
    ours = timed(dm.train_dataloader(), samples)
    transform, size = build_transform(TINY), decode_size(TINY)

    def decode(sample: dict) -> tuple[torch.Tensor, str, int]:
        return transform(open_image(sample["jpg"], size)), sample["txt"].decode("utf-8"), int(sample["__key__"])

    # webdataset's own recipe: shards split over the workers, shuffled through a buffer.
    dataset = wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                             workersplitter=wds.split_by_worker).shuffle(1000).map(decode)
    theirs = timed(DataLoader(dataset, batch_size=BATCH, num_workers=WORKERS), samples)
    return {"vlm-lab": ours, "pytorch": theirs}


# --------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/vlm_lab_stream_scale"))
    parser.add_argument("--shards", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--resampled-samples", type=int, default=160_000)
    parser.add_argument("--delete", action="store_true", help="delete the shards at the end")
    args = parser.parse_args()
    if args.shards % (RANKS * WORKERS) or args.per_shard * (args.shards // (RANKS * WORKERS)) % BATCH:
        sys.exit(f"--shards must be a multiple of {RANKS * WORKERS} and each reader's samples of {BATCH}")
    torch.set_num_threads(1)
    tokenizer = load_tokenizer(None)
    print(f"start {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; load average {os.getloadavg()[0]:.1f}; "
          f"{len(os.sched_getaffinity(0))} cores", flush=True)
    generated = generate(args.root, args.shards, args.per_shard)
    print(f"shards: {args.shards} x {args.per_shard} samples in {args.root} ({disk_bytes(args.root) / 2**30:.2f} GB), "
          + (f"generated in {generated:.0f} s" if generated else "reused"), flush=True)

    cpu = cpu_seconds()
    started = time.perf_counter()
    exact = exact_epoch(args.root, args.shards, args.per_shard, tokenizer)
    exact_wall, exact_cpu = time.perf_counter() - started, cpu_seconds() - cpu
    started, cpu = time.perf_counter(), cpu_seconds()
    resampled = resampled_epoch(args.root, args.shards, args.resampled_samples, tokenizer)
    resampled_wall, resampled_cpu = time.perf_counter() - started, cpu_seconds() - cpu
    readers = reader_comparison(args.root, tokenizer)

    total = args.shards * args.per_shard
    after_20k = exact["rss"][0]
    print(f"\nend {time.strftime('%Y-%m-%d %H:%M:%S %Z')}; load average {os.getloadavg()[0]:.1f}\n")
    print(f"1. exact epoch, 3 sources as one stream, {RANKS} ranks x {WORKERS} workers, batch {BATCH} "
          f"({exact_wall:.0f} s wall, {exact_cpu:.0f} s CPU):")
    print(f"   time to first batch per rank: max {max(exact['first_batch_s']):.2f} s, mean "
          f"{np.mean(exact['first_batch_s']):.2f} s (of which data module + plan: max {max(exact['plan_s']):.2f} s); "
          f"target < 10 s")
    print(f"   samples read {exact['samples']:,} of {total:,}; times seen: "
          f"{', '.join(f'{n}x: {c:,}' for n, c in sorted(exact['seen_counts'].items()))}")
    print(f"   main-process RSS: {after_20k[1]:.0f} MB after {after_20k[0]:,} samples, {exact['rss'][-1][1]:.0f} MB "
          f"after {exact['rss'][-1][0]:,} ({exact['rss'][-1][1] - after_20k[1]:+.0f} MB; target < +100 MB); "
          f"along the way: {', '.join(f'{n // 1000}k {mb:.0f}' for n, mb in exact['rss'])}")
    print(f"2. resampled mixture, weights {WEIGHTS} ({resampled_wall:.0f} s wall, {resampled_cpu:.0f} s CPU): "
          f"{resampled['samples']:,} samples, shares "
          + ", ".join(f"{name} {share:.4f} ({100 * (share - WEIGHTS[name]):+.2f} points)"
                      for name, share in resampled["shares"].items()))
    print(f"3. readers over the same 40 shards, {WORKERS} workers, batch {BATCH}, 32 px:")
    for name, (wall, cpu_s, count) in readers.items():
        label = "vlm-lab stream (decode, transform, tokenise)" if name == "vlm-lab" else \
            "PyTorch DataLoader + webdataset (decode, transform)"
        print(f"   {label}: {count / wall:,.0f} samples/s, {1000 * cpu_s / count:.3f} ms CPU per sample "
              f"({count:,} samples, {wall:.1f} s)")
    ratio = (readers["vlm-lab"][2] / readers["vlm-lab"][0]) / (readers["pytorch"][2] / readers["pytorch"][0])
    print(f"   vlm-lab / PyTorch default: {ratio:.2f}x samples/s")
    if args.delete:
        shutil.rmtree(args.root)
        print(f"deleted {args.root}")


if __name__ == "__main__":
    main()
