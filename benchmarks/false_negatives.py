"""What the false-negative settings cost (docs/how-to/false-negatives.md), on Flickr8k's training captions.

1. ``data.unique_images_per_batch``: the time to deal one epoch's batches (30,455 captions of 6,091
   images, batches of 256), and, for comparison, how many same-image pairs a plain shuffled batch holds.
2. ``model.loss.multi_positive``: CLIP's loss forward + backward on one batch of 256 x 256 features,
   one-positive, multi-positive without repeats, multi-positive with repeats. Wall and CPU time.

    python benchmarks/false_negatives.py [--captions ../shared/data/flickr8k/annotations/captions_train.json]
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter

import torch

from vlm_lab.data.coco import read_coco_captions
from vlm_lab.data.records import CaptionedImages
from vlm_lab.data.unique_images import unique_image_batches
from vlm_lab.losses import ClipLoss

BATCH = 256


def dealing(captions: str) -> None:
    records = read_coco_captions(captions, ".")
    images = CaptionedImages(records, None, None, per_caption=True).entry_images()
    print(f"{len(images)} captions of {len(set(images))} images, batches of {BATCH}")
    for epoch in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        batches = unique_image_batches(images, BATCH, epoch)
        repeats = max(BATCH - len({images[e] for e in batch}) for batch in batches)
        print(f"  epoch {epoch}: {len(batches)} batches dealt in {time.perf_counter() - wall:.3f} s wall, "
              f"{time.process_time() - cpu:.3f} s CPU; most repeats in a batch: {repeats}")
    order = list(range(len(images)))
    random.Random(0).shuffle(order)
    pairs = [sum(n * (n - 1) // 2 for n in Counter(images[e] for e in order[i:i + BATCH]).values())
             for i in range(0, len(order) - BATCH + 1, BATCH)]
    print(f"  plain shuffle: {sum(pairs) / len(pairs):.2f} same-image pairs per batch (most {max(pairs)})")


def loss_cost() -> None:
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(BATCH, 256), dim=-1).requires_grad_()
    text = torch.nn.functional.normalize(torch.randn(BATCH, 256), dim=-1).requires_grad_()
    cases = [("one-positive", ClipLoss(), {}),
             ("multi, no repeats", ClipLoss(multi_positive=True), {"image_ids": torch.arange(BATCH)}),
             ("multi, repeats", ClipLoss(multi_positive=True), {"image_ids": torch.randint(0, 1200, (BATCH,))})]
    for name, loss, ids in cases:
        for _ in range(20):
            loss(image, text, **ids).backward()
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(200):
            loss(image, text, **ids).backward()
        print(f"  {name:18s} {(time.perf_counter() - wall) / 0.2:.2f} ms wall, "
              f"{(time.process_time() - cpu) / 0.2:.2f} ms CPU per forward + backward")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--captions", default="../shared/data/flickr8k/annotations/captions_train.json")
    args = parser.parse_args()
    dealing(args.captions)
    print(f"CLIP loss, {BATCH} pairs of 256-d features, {torch.get_num_threads()} threads:")
    loss_cost()


if __name__ == "__main__":
    main()
